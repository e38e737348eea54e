"""Pruned checkpoints on disk: ``save`` (with its self-check), ``load``, the ``config.json`` formats
(``config_json``) and the modeling code shipped inside them (``modeling_pruned``).

Import from the modules (``pruning.checkpoint.load``); this package imports nothing, because surgery
takes the zero stand-ins from ``modeling_pruned`` and must not pull in the saver that imports surgery.
"""
