"""Mutants shown equivalent: no input can tell them from the original. Keyed by module and the
mutant's key (``python -m tools.mutation --list`` prints them); each with the reason, reviewed like code.
A key that no longer names a mutant, or names one the tests kill, is flagged in the report, so this
list cannot quietly outlive the code.
"""

from __future__ import annotations

_TOP_LEVEL_TIES = (
    "get_expanded_tied_weights_keys(all_submodels=...): every supported family (and PrunedForCausalLM) "
    "declares its ties on the top-level CausalLM only, so both give the same mapping (checked on all 8 "
    "tiny architectures)"
)
_SQUARE = "the matrix is a Gram (square), so shape[1] == shape[0]"

EQUIVALENT: dict[str, dict[str, str]] = {
    "pruning.rundir.staging": {
        "StagedRun._recover: delete call statement #2": (
            "previous_runs.remove(restored): the restored directory no longer exists under its old name, and "
            "cleaning up a missing directory reads no run.json, removes nothing and logs nothing"
        ),
        "StagedRun._close: delete break #1": (
            "the parents it made are removed deepest first; once one cannot be removed, every later one is "
            "its ancestor and still holds it, so each further rmdir fails too"
        ),
        "_clean_up: True -> False #1": (
            "that return is reached only with a manifest (publish), whose caller ignores the value"
        ),
    },
    "pruning.rundir.target": {
        "_strangers: delete continue #1": (
            "the continue is the whole body of the last branch taken in the loop: pass does the same"
        ),
    },
    "pruning.rundir.lock": {
        "_write_holder: 0 -> 1 #1": (
            "ftruncate(fd, 1) then writing the non-empty record from offset 0 overwrites that one byte: the "
            "file holds exactly the record either way"
        ),
    },
    "pruning.checkpoint.save": {
        "save_pruned_model: delete call statement #7": (
            "out.rmdir() before the rename: on POSIX a directory renamed onto an empty one replaces it, and "
            "partial_dir has already refused a non-empty out"
        ),
        "verify_saved: True -> False #1": _TOP_LEVEL_TIES,
    },
    "pruning.checkpoint.load": {
        "_check_names: True -> False #1": _TOP_LEVEL_TIES,
        "load_pruned_model: True -> False #1": _TOP_LEVEL_TIES,
        "_check_names: True -> False #2": (
            "state_dict(keep_vars=...): only the key names are read; keep_vars changes whether values detach"
        ),
        "_stored_dtype: 1 -> 2 #1": (
            "most_common(2)[0] is most_common(1)[0]: one stable descending sort, ties to the first seen"
        ),
    },
    "pruning.families.layout": {
        "Layout.check_within: // -> / #1": (
            "families.config_limits refuses a dense config whose heads are not whole KV groups before it "
            "calls check_within, so heads / kv_heads is an integer equal to heads // kv_heads"
        ),
    },
    "pruning.compensation.obs": {
        "greedy_removal: 0 -> 1 #1": f"torch.eye(h.shape[1]): {_SQUARE}",
        "_exact_state: 0 -> 1 #1": f"torch.eye(h.shape[1]): {_SQUARE}",
        "block_errors: 1 -> 2 #1": "h_ss.shape[-1] -> h_ss.shape[-2]: h_ss is [structures, width, width]",
        "greedy_removal: 1e-300 -> 2e-300 #1": (
            "the floor acts only when a chunk's single errors sum below 1e-300; each share is then below "
            "~1e-240, so the float32 charges are 0 either way, and the order does not depend on shares"
        ),
    },
    "pruning.compensation.refit": {
        "ridge_refit: 0.0 -> 1.0 #1": (
            "that branch runs only when nothing is kept: the Gram is 0x0, and damping an empty diagonal "
            "does nothing"
        ),
    },
}
