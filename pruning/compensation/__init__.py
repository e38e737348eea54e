"""Compensation: refit what a block keeps so it writes what the dense block wrote (``refit``), and the
greedy optimal-brain-surgeon removal order shared with the OBS criteria (``obs``)."""
