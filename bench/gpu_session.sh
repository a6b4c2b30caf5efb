#!/usr/bin/env bash
# One GPU session (an H100 or H200), in under 8 minutes, for issue 25 items 5-6:
#   1. bench/train_throughput.py --preset gpt2 --compile: ours against Transformers' GPT2LMHeadModel, eager and
#      compiled, in the same run (the README's "Training throughput on a GPU" table);
#   2. two processes of the pipeline's own launcher (params launch.nproc_per_node=2, NCCL) on the one GPU,
#      with strategy ddp and fsdp: a smoke test that they train a few steps and exit 0;
#   3. ours alone with the fast paths, one change at a time: cuDNN and flash SDPA, micro-batch 32, compile mode
#      max-autotune (tuned matmuls + CUDA graphs), and the foreach (unfused) AdamW against the fused default.
# Each step has its own time limit, cut to what is left of BUDGET seconds (default 470) and skipped when under
# 20 s are left, so the script ends within 8 minutes; the steps run in order of need (the comparison, the NCCL
# smoke test, then the fast paths). Every output and a summary (summary.txt: each step's exit code, time and
# last lines; *.json: the benchmark rows) go to OUT_DIR.
#
# Usage (from the repository root):
#   bench/gpu_session.sh [OUT_DIR]          # on the GPU machine; OUT_DIR defaults to $OUT, else bench/results/gpu
#   DRY=1 bench/gpu_session.sh /tmp/dry     # CPU-sized dry run of every step (tiny shapes, no compile): checks
#                                           # that the script and its commands run, in a few minutes on 2 cores
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results/gpu}}
PY=${PYTHON:-python}
DRY=${DRY:-0}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" LLM_TRACKING=0
: > "$OUT_DIR/summary.txt"

BUDGET=${BUDGET:-470}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, record its exit code and time
  local name=$1 limit=$2 start=$SECONDS left=$((BUDGET - SECONDS))
  shift 2
  if [ "$left" -lt 20 ]; then echo "== $name: skipped, ${left}s left of ${BUDGET}s" | tee -a "$OUT_DIR/summary.txt"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT_DIR/summary.txt"
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.txt" 2>&1
  local code=$?
  echo "   exit $code after $((SECONDS - start))s" | tee -a "$OUT_DIR/summary.txt"
  tail -n 6 "$OUT_DIR/$name.txt" | sed 's/^/   /' | tee -a "$OUT_DIR/summary.txt"
}

if [ "$DRY" = 1 ]; then  # the same commands at CPU size: no compile, tiny model, 2 steps
  BENCH=(bench/train_throughput.py --preset nanogpt --device cpu --steps 2 --warmup 1 --threads 1)
  COMPILE=()
  FAST_SDPA=(math flash)
  TUNED_MODE=default
  DEVICE=cpu
  BIG_BATCH=24
else
  BENCH=(bench/train_throughput.py --preset gpt2 --steps 20 --warmup 5)
  COMPILE=(--compile)
  FAST_SDPA=(cudnn flash)
  TUNED_MODE=max-autotune
  DEVICE=cuda
  BIG_BATCH=32
fi

{ nvidia-smi || true; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"; } \
  > "$OUT_DIR/machine.txt" 2>&1

# 1. ours against Transformers, eager and compiled, default paths (fused AdamW, PyTorch's SDPA choice)
step baseline 170 "$PY" "${BENCH[@]}" "${COMPILE[@]}" --json "$OUT_DIR/baseline.json"

# 2. two processes of the stage's own launcher on this one GPU (NCCL; gloo in the dry run), ddp then fsdp
DATA="$OUT_DIR/launch_data"
mkdir -p "$DATA"
cat > "$DATA/make.py" <<'EOF'
"""A tiny tokenized corpus (char tokenizer) for the launch smoke test."""
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from helpers import write_corpus  # noqa: E402

from llm.config import DataParams, TokenizerParams  # noqa: E402
from llm.data.clean import clean_corpus  # noqa: E402
from llm.data.tokenizer import train_tokenizer_on_split  # noqa: E402
from llm.data.tokens import tokenize_corpus  # noqa: E402

if __name__ == "__main__":
    root = Path(sys.argv[1])
    write_corpus(root / "corpus")
    clean_corpus(DataParams(val_fraction=0.3, min_doc_chars=100), root / "corpus", root / "clean")
    train_tokenizer_on_split(TokenizerParams(kind="char"), root / "clean" / "train.txt", root / "tokenizer")
    tokenize_corpus(root / "clean", root / "tokenizer", root / "tokens", workers=2)
    print("prepared", root)
EOF
step launch_data 60 "$PY" "$DATA/make.py" "$DATA"
for strategy in ddp fsdp; do
  step "launch_2x_$strategy" 60 "$PY" -m llm pretrain --tokens "$DATA/tokens" --tokenizer "$DATA/tokenizer" \
    --out "$DATA/out_$strategy" --model-set context_length=64 --model-set n_layer=2 --model-set d_model=64 \
    --set max_steps=20 --set eval_interval=10 --set checkpoint_interval=10 --set batch_size=8 \
    --set device=$DEVICE --set progress=false --set strategy=$strategy --set launch.nproc_per_node=2
done

# 3. the fast paths, ours alone, compiled (about 40 s each), one change at a time
for kernel in "${FAST_SDPA[@]}"; do
  step "sdpa_$kernel" 60 "$PY" "${BENCH[@]}" "${COMPILE[@]}" --only ours --sdpa "$kernel" --json "$OUT_DIR/sdpa_$kernel.json"
done
step "batch_$BIG_BATCH" 60 "$PY" "${BENCH[@]}" "${COMPILE[@]}" --only ours --batch-size "$BIG_BATCH" \
  --json "$OUT_DIR/batch_$BIG_BATCH.json"
step "compile_$TUNED_MODE" 100 "$PY" "${BENCH[@]}" "${COMPILE[@]}" --only ours --compile-mode "$TUNED_MODE" \
  --json "$OUT_DIR/compile_$TUNED_MODE.json"
step adamw_foreach 50 "$PY" "${BENCH[@]}" "${COMPILE[@]}" --only ours --adamw foreach --json "$OUT_DIR/adamw_foreach.json"

echo "== done in ${SECONDS}s; outputs in $OUT_DIR" | tee -a "$OUT_DIR/summary.txt"
