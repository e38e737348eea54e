"""Reference structured-pruning methods, re-implemented on this project's plan and surgery.

Every method is a function ``(model, windows, ratio, batch_size) -> notes`` that prunes ``model`` in
place until ``ratio`` of ALL its parameters are gone (the tied embedding counted once, as
``plan_global(..., ratio_of="total")`` counts; only decoder layers lose anything) and returns a small
JSON-ready dict: the parameters counted before and after, the share actually removed, and what the
method chose or needed. All but Torch-Pruning build a ``PruningPlan`` and remove it with
``pruning.surgery.apply_plan``, so the rows of a comparison differ only in *what* each removes.

Structures are this project's: a KV group (one KV head with the query heads that share it) and an MLP
channel. The papers' LLaMA-7B is multi-head attention, where a KV group is one head; on a GQA model
a "head" of theirs is a KV group here.

- ``random``: random scores, this project's global ranking (seeded).
- ``magnitude_uniform``: L2 norm of the weights each structure owns, same share in every layer.
- ``wanda_sp_uniform``: Wanda-sp as FLAP's baseline (An et al., AAAI 2024, github.com/CASIA-IVA-Lab/FLAP
  ``lib/prune.py:prune_wanda_sp``), same share in every layer.
- ``llm_pruner_taylor``: LLM-Pruner block-wise (Ma et al., NeurIPS 2023, github.com/horseee/LLM-Pruner
  ``hf_prune.py --block_wise --pruner_type taylor --taylor param_first``), middle layers only.
- ``flap``: FLAP's fluctuation metric, AL-AM global ranking and bias compensation (``prune_flap``).
- ``torch_pruning``: Torch-Pruning's own ``BasePruner`` (alias ``MetaPruner``) configured as its
  ``examples/LLMs/prune_llm.py`` (v1.6.1) does; its own surgery, and what it needed is in the notes.
"""

from __future__ import annotations

from .common import Notes, ReferenceMethod, count_params, describe, uniform_counts
from .flap import flap
from .llm_pruner import llm_pruner_taylor
from .simple import magnitude_uniform, random
from .torch_pruning_row import torch_pruning
from .wanda_sp import wanda_sp_uniform

METHODS: dict[str, ReferenceMethod] = {
    "random": random,
    "magnitude_uniform": magnitude_uniform,
    "torch_pruning": torch_pruning,
    "wanda_sp_uniform": wanda_sp_uniform,
    "llm_pruner_taylor": llm_pruner_taylor,
    "flap": flap,
}

__all__ = ["METHODS", "Notes", "ReferenceMethod", "count_params", "describe", "uniform_counts"]
