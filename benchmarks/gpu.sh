#!/usr/bin/env bash
# The paper-geometry rows of benchmarks/README.md ("Paper geometry") in bf16 on one CUDA GPU: random ESM-2 650M +
# TinyLlama-1.1B parts (training/build_geometry_parts.py), then the rows of benchmarks/paper_geometry.py with
# --device cuda: the structure module at L = 1022 inside the full encoder, generation against the bare LLM and the
# sequence-as-text baseline (32 and 128 new tokens, batch 1 and 8), fp32 against bf16 (autocast and bf16 weights)
# with achieved FLOP/s against the measured matmul peak, and the training step of stage 1 and stage 2 at L = 1022
# (fp32, activation checkpointing, bf16 autocast; stage 2 trains 3.1B expert parameters: ~60 GB with AdamW).
#
# NOT RUN YET: no GPU was lent to the task that wrote it (checked with `bash -n` only). Sized for a single H100/H200
# (80 GB or more) to finish in under 8 minutes, most of it building and loading the 1.75B random parameters.
#
# Needs: the project's environment with a CUDA build of torch (PYTHON), a text tokenizer folder smaller than 32,000
# tokens for the LLM side (TEXT_TOKENIZER, e.g. the tiny parts' language_model folder that `./run.sh main` writes) and
# a real tokenizer for the as-text prompt lengths (SEQUENCE_TOKENIZER, e.g. `python training/build_smollm2.py`'s
# folder). Results go to $OUT (default outputs/gpu-bench), one log per row. Usage, from the repository root:
#
#   TEXT_TOKENIZER=outputs/main/parts/language_model SEQUENCE_TOKENIZER=outputs/main/smollm2 bash benchmarks/gpu.sh
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
TEXT_TOKENIZER=${TEXT_TOKENIZER:-outputs/main/parts/language_model}
SEQUENCE_TOKENIZER=${SEQUENCE_TOKENIZER:-$TEXT_TOKENIZER}
OUT=${OUT:-outputs/gpu-bench}
PARTS=${PARTS:-$OUT/paper-parts}
export PYTHONPATH=. HF_HUB_OFFLINE=1
mkdir -p "$OUT"

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

if [ ! -d "$PARTS" ]; then
    timeout 180 "$PYTHON" training/build_geometry_parts.py --protein_geometry esm2_650m --llm_geometry tinyllama_1.1b \
        --text_tokenizer "$TEXT_TOKENIZER" --output_dir "$PARTS" 2>&1 | tail -1
fi

row() {  # row NAME SECONDS ARGS...: one benchmark row, its output in $OUT/NAME.log
    local name=$1 seconds=$2
    shift 2
    echo "== $name ($(date -u +%T))"
    timeout "$seconds" "$PYTHON" benchmarks/paper_geometry.py "$@" --parts "$PARTS" --device cuda --repeats 5 \
        2>&1 | grep -v Warning | tee "$OUT/$name.log" | grep -E "^\||/|peak|stage" || echo "$name failed: see $OUT/$name.log"
}

row structure 60 structure --length 1022 --weights bf16
row generation_32 90 generation --new_tokens 32 --batch_sizes 1 8 --weights bf16 --sequence_tokenizer "$SEQUENCE_TOKENIZER"
row generation_128 120 generation --new_tokens 128 --batch_sizes 1 8 --weights bf16 \
    --sequence_tokenizer "$SEQUENCE_TOKENIZER"
row bf16 60 bf16
row training 150 training --length 1022
echo "== done ($(date -u +%T)); logs in $OUT"
