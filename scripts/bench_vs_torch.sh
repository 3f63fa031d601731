#!/usr/bin/env bash
# pali's training step against the PyTorch + HF transformers reference (bench/torch_train_step.py:
# forward + backward + AdamW, eager attention) on the same model config, batch, text length and
# thread count, alternating run by run on the CPU; prints each measurement and the ratio of
# tokens/s (pali / PyTorch; above 1 means pali is faster).
#
# Usage: scripts/bench_vs_torch.sh [nano|small|all] [ROUNDS]   (THREADS=2 by default)
# The first run creates bench/.venv with torch 2.15.0 and transformers 5.24.0 (PyPI's Linux torch
# wheel with its CUDA libraries is about 5.6 GB; no GPU is needed).
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"
rounds="${2:-3}"
threads="${THREADS:-2}"
venv="${PALI_BENCH_VENV:-bench/.venv}"

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, transformers" 2>/dev/null; then
  echo "== creating $venv (torch 2.15.0, transformers 5.24.0)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.15.0 transformers==5.24.0
fi
cargo build --release -q
pali=target/release/pali

# name batch text_len
configs=()
case "$which" in
  nano) configs=("nano 8 32") ;;
  small) configs=("small 4 48") ;;
  all) configs=("nano 8 32" "small 4 48") ;;
  *) echo "unknown config $which (nano, small, all)" >&2; exit 2 ;;
esac

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
for c in "${configs[@]}"; do
  read -r name batch text <<<"$c"
  pali_tps=(); torch_tps=()
  for r in $(seq "$rounds"); do
    p=$(RAYON_NUM_THREADS="$threads" "$pali" bench train-step --config "bench/$name/config.json" \
          --batch "$batch" --text-len "$text" --steps 10 --warmup 3)
    t=$(OMP_NUM_THREADS="$threads" "$venv/bin/python" bench/torch_train_step.py "bench/$name" \
          "$threads" "$batch" "$text")
    pt=$(echo "$p" | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_second"])')
    tt=$(echo "$t" | "$venv/bin/python" -c 'import json,sys; print(json.loads(sys.stdin.read())["tokens_per_s"])')
    echo "$name round $r: pali $pt tokens/s, torch $tt tokens/s" >&2
    pali_tps+=("$pt"); torch_tps+=("$tt")
  done
  pm=$(printf '%s\n' "${pali_tps[@]}" | median)
  tm=$(printf '%s\n' "${torch_tps[@]}" | median)
  ratio=$(awk -v a="$pm" -v b="$tm" 'BEGIN {printf "%.3f", a / b}')
  echo "{\"config\": \"$name\", \"batch\": $batch, \"text_len\": $text, \"threads\": $threads, \"rounds\": $rounds, \"pali_tokens_per_s\": $pm, \"torch_tokens_per_s\": $tm, \"ratio\": $ratio}"
done
