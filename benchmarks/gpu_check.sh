#!/usr/bin/env bash
# One check of the GPU path, installing nothing: CPU-vs-device agreement of the RIM core (1e-4), the
# core benchmark, PPO training throughput for none (feed-forward CNN), lstm and rims, and the peak
# memory of one PPO update, all on the device, with and without rims.compile (reduce-overhead: CUDA
# graphs; left out by --quick, whose point is the path, not the figures); then one table.
#
#   bash benchmarks/gpu_check.sh                 # on a machine with a GPU (about 5 minutes)
#   bash benchmarks/gpu_check.sh --device cpu --quick   # the same path on the CPU, in seconds
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "error: unknown argument $1 (use --device cpu|cuda and --quick)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA device here: run with --device cpu" >&2
  exit 2
fi
if [ "$QUICK" = 1 ]; then
  CORE=(--rounds 1 --warmup 0 --steps 8); TRAIN=(--rounds 1 --updates 1); MEM=(--cores none,rims)
  VARIANTS=ppo-cnn,ours-lstm,ours-rims
else
  CORE=(--rounds 15 --compile); TRAIN=(--rounds 3 --updates 2); MEM=(--cores none,lstm,rims)
  VARIANTS=ppo-cnn,ours-lstm,ours-rims,ours-rims-compiled
fi
LOG="$(mktemp -d)"
"$PY" benchmarks/device_agreement.py --device "$DEVICE" | tee "$LOG/agree.txt"
"$PY" benchmarks/core_speed.py --device "$DEVICE" "${CORE[@]}" | tee "$LOG/core.txt"
"$PY" benchmarks/train_throughput.py --device "$DEVICE" --variants "$VARIANTS" "${TRAIN[@]}" \
  | tee "$LOG/train.txt"
"$PY" benchmarks/update_memory.py --device "$DEVICE" "${MEM[@]}" | tee "$LOG/memory.txt"
echo
echo "=== gpu_check on $DEVICE ==="
grep "agreement within" "$LOG/agree.txt"
grep -hE "^compile time|warm-up iteration" "$LOG/core.txt" "$LOG/train.txt" || true
grep -E "^(nn.LSTM|RIMCore)" "$LOG/core.txt" | sed 's/ compiled/-compiled/' \
  | awk '{printf "core   %-22s %s s (%s nn.LSTM)\n", $1" "$2, $(NF-2), $(NF-1)}'
grep -E "^(ppo-cnn|ours-lstm|ours-rims|ours-rims-compiled) " "$LOG/train.txt" | awk '{printf "train  %-22s %s steps/s (%s ppo-cnn)\n", $1, $2, $4}'
grep -E "^(none|lstm|rims) " "$LOG/memory.txt" | awk '{printf "memory %-22s %s MiB per PPO update\n", $1, $2}'
grep -q "agreement within .*: yes" "$LOG/agree.txt"
