#!/usr/bin/env bash
# The one script for the GPU machine (../shared/GPU.md). From the repository root:
#   OUT=/some/folder bash bench/gpu_check.sh
# 1. builds and installs pfkernels without build isolation and without downloads;
# 2. runs the whole test suite, CUDA tests included;
# 3. runs compute-sanitizer memcheck and racecheck over bench/cuda_ops_driver.py (every CUDA op);
# 4. runs every benchmark on the GPU.
# Everything lands in $OUT (default bench/results/) as three files named with the device and the
# date: gpu_check_<tag>.log (all output), gpu_check_<tag>.json (all benchmark JSON merged) and
# gpu_check_<tag>.md (a short table).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-')
tag="${gpu:-nogpu}_$(date -u +%Y%m%d)"
log="$OUT/gpu_check_$tag.log"
work=$(mktemp -d)
status=0
step() { echo; echo "=== $*" | tee -a "$log"; }
: >"$log"

step "device"
nvidia-smi 2>&1 | tee -a "$log"

step "build and install (no isolation, no downloads)"
PFKERNELS_CUDA=ON $PY -m pip install --no-build-isolation --no-deps --no-index -v . >>"$log" 2>&1 || { echo "build failed" | tee -a "$log"; exit 1; }
$PY -c "import pfkernels, json; print(json.dumps(pfkernels.backend_info()))" 2>&1 | tee -a "$log"

step "tests (all, CUDA included)"
$PY -P -m pytest -q -p no:cacheprovider tests 2>&1 | tee -a "$log" | tail -n 5 || status=1

for tool in memcheck racecheck; do
  step "compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 9 $PY -P bench/cuda_ops_driver.py >>"$log" 2>&1
  rc=$?
  echo "compute-sanitizer $tool exit code: $rc" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
done

step "benchmarks"
# Every benchmark that takes --device runs on the GPU (each within BENCH_TIMEOUT seconds);
# bench_distributed needs one GPU per rank, so it runs only where there are two.
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l)
for bench in bench/bench_*.py; do
  name=$(basename "$bench" .py)
  if ! grep -q -- '"--device"' "$bench"; then
    echo "--- $name: CPU-only benchmark, skipped" | tee -a "$log"
    continue
  fi
  if [ "$name" = bench_distributed ] && [ "$gpus" -lt 2 ]; then
    echo "--- $name: needs 2 GPUs, skipped" | tee -a "$log"
    continue
  fi
  echo "--- $name" | tee -a "$log"
  timeout "${BENCH_TIMEOUT:-240}" $PY "$bench" --device cuda --out "$work" >>"$log" 2>&1 \
    || { echo "$name failed or timed out" | tee -a "$log"; status=1; }
done

$PY - "$work" "$OUT/gpu_check_$tag.json" "$OUT/gpu_check_$tag.md" "$tag" <<'PY' 2>&1 | tee -a "$log"
import json, sys
from pathlib import Path
work, out_json, out_md, tag = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
merged = {p.name: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
out_json.write_text(json.dumps(merged, indent=2))
lines = [f"# gpu_check {tag}", "", "| file | key | value |", "|---|---|---|"]
for name, payload in merged.items():
    for key, value in payload.items():
        if isinstance(value, (int, float, str)) and key != "machine":
            lines.append(f"| {name} | {key} | {value} |")
out_md.write_text("\n".join(lines) + "\n")
print(f"wrote {out_json} and {out_md}")
PY
rm -rf "$work"
echo "gpu_check status: $status" | tee -a "$log"
exit $status
