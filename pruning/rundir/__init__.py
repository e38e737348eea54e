"""The output directory as a transaction: what a run may write over (``target``, with the manifest),
the private staging directory published by renames (``staging``) and the lock (``lock``).
docs/reliability.md gives the guarantees."""
