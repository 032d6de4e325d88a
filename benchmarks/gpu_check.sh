#!/usr/bin/env bash
# One check of the GPU path, installing nothing: CPU-vs-device agreement of the RIM core (1e-4) and
# no host synchronisation inside its time loop (CUDA), the rims.cuda_graphs tests (CUDA), train.py
# and evaluate.py end to end on the device (a short RIM run on the pickup room, its checkpoint
# evaluated under a shift), the core benchmark, PPO training throughput for none (feed-forward CNN),
# lstm and rims, and the peak memory of one PPO update, all on the device, with and without
# rims.compile (reduce-overhead: CUDA graphs of the step) and rims.cuda_graphs (graphs of the whole
# unroll), both left out by --quick, whose point is the path, not the figures; then one table.
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
  CORE=(--rounds 1 --warmup 0 --steps 8); TRAIN=(--rounds 1 --updates 1 --warmup 0 --n-steps 32)
  MEM=(--cores none,rims --n-steps 32)
  VARIANTS=ppo-cnn,ours-lstm,ours-rims
else
  CORE=(--rounds 15 --compile); TRAIN=(--rounds 3 --updates 2); MEM=(--cores none,lstm,rims)
  VARIANTS=ppo-cnn,ours-lstm,ours-rims,ours-rims-compiled,ours-rims-graphs
fi
LOG="$(mktemp -d)"
"$PY" benchmarks/device_agreement.py --device "$DEVICE" | tee "$LOG/agree.txt"
if [ "$DEVICE" = cuda ]; then  # rims.cuda_graphs: graphed unrolls equal eager ones (the GPU-only tests)
  "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py | tee "$LOG/graphs.txt"
fi
RUN="$LOG/run"
"$PY" train.py --env RIMAgents/Pickup-6x6-v0 --core rims --device "$DEVICE" --total-timesteps 1024 --n-envs 4 \
  --run-dir "$RUN" --no-progress ppo.n_steps=128 ppo.batch_size=256 >"$LOG/train_run.txt" 2>&1 \
  || { cat "$LOG/train_run.txt"; exit 1; }
"$PY" evaluate.py "$RUN" --shifts novel-distractors --episodes 4 --n-envs 2 --device "$DEVICE" --out "$LOG/eval" --no-progress \
  >"$LOG/eval_run.txt" 2>&1 || { cat "$LOG/eval_run.txt"; exit 1; }
"$PY" - "$RUN" "$DEVICE" <<'PY' | tee "$LOG/e2e.txt"
import sys

from pathlib import Path

from rim_agents.models import load_model
from rim_agents.runs import load_run_config, newest_model

run = Path(sys.argv[1])
model = load_model(load_run_config(run), newest_model(run), device=sys.argv[2])
where = {str(p.device) for p in model.policy.parameters()}
print(f"train.py + evaluate.py on {sys.argv[2]}: parameters on {','.join(sorted(where))}")
PY
"$PY" benchmarks/core_speed.py --device "$DEVICE" "${CORE[@]}" | tee "$LOG/core.txt"
"$PY" benchmarks/train_throughput.py --device "$DEVICE" --variants "$VARIANTS" "${TRAIN[@]}" \
  | tee "$LOG/train.txt"
"$PY" benchmarks/update_memory.py --device "$DEVICE" "${MEM[@]}" | tee "$LOG/memory.txt"
echo
echo "=== gpu_check on $DEVICE ==="
grep -E "agreement within|host synchronisations in the RIM loop" "$LOG/agree.txt"
cat "$LOG/e2e.txt"
[ -f "$LOG/graphs.txt" ] && tail -1 "$LOG/graphs.txt" | sed 's/^/cuda_graphs tests: /'
grep -hE "^compile time|^record time|warm-up iteration" "$LOG/core.txt" "$LOG/train.txt" || true
grep -E "^(nn.LSTM|RIMCore)" "$LOG/core.txt" | sed 's/ compiled/-compiled/; s/ cuda-graphs/-cuda-graphs/' \
  | awk '{printf "core   %-22s %s s (%s nn.LSTM)\n", $1" "$2, $(NF-2), $(NF-1)}'
grep -E "^(ppo-cnn|ours-lstm|ours-rims|ours-rims-compiled|ours-rims-graphs) " "$LOG/train.txt" | awk '{printf "train  %-22s %s steps/s (%s ppo-cnn)\n", $1, $2, $4}'
grep -E "^(none|lstm|rims) " "$LOG/memory.txt" | awk '{printf "memory %-22s %s MiB per PPO update\n", $1, $2}'
grep -q "agreement within .*: yes" "$LOG/agree.txt"
