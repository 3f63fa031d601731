#!/usr/bin/env bash
# The device check for a lent GPU machine: CUDA training, bf16 and MFU, in about 5 minutes.
#
# Build here (no GPU needed; the binary loads the CUDA driver at run time), strip it to fit the
# 64 MiB carry limit, carry it, and run this script from the repository root over there:
#   cargo build --release --features cuda && strip -o pali-cuda target/release/pali
#   scripts/gpu-check.sh ./pali-cuda OUT_DIR [PEAK_TFLOPS_F32 PEAK_TFLOPS_BF16]
# Peaks are the device's dense figures (H100 SXM: 67 f32 / 989 bf16; H200 the same).
# Writes JSON (bench) and logs (quickstart) under OUT_DIR; compare the quickstart losses with the
# CPU ones in README.md.
set -uo pipefail
bin=${1:?usage: gpu-check.sh PALI_BINARY OUT_DIR [PEAK_F32 PEAK_BF16]}
out=${2:?usage: gpu-check.sh PALI_BINARY OUT_DIR [PEAK_F32 PEAK_BF16]}
peak32=${3:-67}
peak16=${4:-989}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.csv" 2>&1

# Training step of PaliGemma 3B at 224 px, f32 and bf16 (MFU against each dtype's peak).
for dt in f32 bf16; do
  peak=$peak32; [ "$dt" = bf16 ] && peak=$peak16
  timeout 240 "$bin" bench train-step --preset paligemma-3b-224 --batch 4 --text-len 64 \
    --steps 5 --warmup 2 --device cuda --dtype "$dt" --peak-tflops "$peak" \
    >"$out/bench-3b-$dt.json" 2>"$out/bench-3b-$dt.log"
  echo "bench 3b $dt: rc=$? $(grep -E '"(step_seconds_median|mfu)"' "$out/bench-3b-$dt.json" | tr -d '\n ')"
done

# The quickstart's first stage on CUDA, f32 then bf16: the losses should track the CPU run's.
for dt in f32 bf16; do
  timeout 120 "$bin" train configs/quickstart.toml --quiet --device cuda --max-steps 300 \
    --set "run.out_dir=\"$out/quickstart-$dt\"" --set "run.dtype=\"$dt\"" \
    >"$out/quickstart-$dt.log" 2>&1
  echo "quickstart stage 1 $dt: rc=$? $(grep -h '"loss"' "$out/quickstart-$dt/metrics.jsonl" | sed -n '1p;$p' | grep -o '"loss":[0-9.]*' | tr '\n' ' ')"
done
