"""The run: checks that need no weights (``preflight``), the stages and their events (``run``), the
pruning pass (``prune_step``), ``--dry-run`` (``dry_run``) and ``run.json`` (``run_record``)."""

from pruning.pipeline.run import prepare, run_pipeline

__all__ = ["prepare", "run_pipeline"]
