"""Source files that a pruned checkpoint carries for transformers to run (``trust_remote_code=True``).

``modeling_pruned.py`` is copied into a checkpoint whose layers differ (``pruning.checkpoint_config``);
it never imports this package, and this package never imports it: it is data here, code there.
See docs/checkpoint-format.md.
"""
