#!/usr/bin/env bash
# Per-step cost of data parallelism over 2 processes against 1 process, same config and global
# batch, alternating (machines are noisy: quote the ratio). Also the all-reduce bandwidth
# between 2 processes on this host.
#
#   scripts/bench_dist.sh [RUN.toml] [STAGE]     (default: the quickstart's stage1)
#   PALI=target/release/pali STEPS=40 REPS=3 PORT=29600 scripts/bench_dist.sh
#
# Steps/s comes from metrics.jsonl (`tokens_per_s` of the logged steps after the first, so the
# start-up is not counted). On a 2-core machine 2 processes share the cores one process uses:
# the ratio is the overhead of the collective, not a speed-up.
set -euo pipefail
cd "$(dirname "$0")/.."
PALI=${PALI:-target/release/pali}
CFG=${1:-configs/quickstart.toml}
STAGE=${2:-stage1}
STEPS=${STEPS:-40}
REPS=${REPS:-3}
PORT=${PORT:-29600}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

sets=(--set "run.stages=[\"$STAGE\"]" --set "stage.$STAGE.log_every=1"
      --set "stage.$STAGE.checkpoint_every=100000" --set "stage.$STAGE.eval.every=0"
      --max-steps "$STEPS" --quiet)
# Median tokens/s of the logged steps 2.. of a run directory.
tps() {
  python3 - "$1/metrics.jsonl" <<'PY'
import json, statistics, sys
v = [json.loads(l)["tokens_per_s"] for l in open(sys.argv[1]) if '"tokens_per_s"' in l][1:]
print(statistics.median(v))
PY
}
one=(); two=()
for r in $(seq "$REPS"); do
  "$PALI" train "$CFG" "${sets[@]}" --set "run.out_dir=\"$OUT/one-$r\""
  one+=("$(tps "$OUT/one-$r")")
  "$PALI" launch --nproc 2 --port "$PORT" -- train "$CFG" "${sets[@]}" --set "run.out_dir=\"$OUT/two-$r\""
  two+=("$(tps "$OUT/two-$r")")
done
python3 - "${one[*]}" "${two[*]}" <<'PY'
import statistics, sys
one = [float(x) for x in sys.argv[1].split()]
two = [float(x) for x in sys.argv[2].split()]
m1, m2 = statistics.median(one), statistics.median(two)
print(f"tokens/s, 1 process:  {one} (median {m1:.0f})")
print(f"tokens/s, 2 processes: {two} (median {m2:.0f})")
print(f"2 processes / 1 process: {m2 / m1:.3f}")
PY
for mb in 1 16 64; do
  "$PALI" launch --nproc 2 --port "$PORT" -- bench allreduce --size-mb "$mb" --iters 10
done
