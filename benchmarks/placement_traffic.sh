#!/usr/bin/env bash
# Recorded in docs/placement.md. Run from anywhere after `make setup`; 2 or 4 CPU ranks (or GPUs).
# Measured all-to-all traffic before and after a placement plan: train 300 steps with contiguous experts, profile
# 100 more (per-rank dispatch), plan from the first 70% of those steps, predict on the held-out 30%, apply the plan
# to the checkpoint, continue 100 steps with it and profile again.   Usage: bash benchmarks/placement_traffic.sh R
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:?usage: placement_traffic.sh NUM_RANKS}; D=${OUT_DIR:-runs/traffic}/ep$R; rm -rf "$D"; mkdir -p "$D"
export OMP_NUM_THREADS=1 BIN=.venv/bin
q() { tr '\r' '\n' | grep -E "^step|^done|rror|Traceback" || true; }
echo "== A: train 300 steps, contiguous"; NUM_RANKS=$R MASTER_PORT=2970$R bash launch/quickstart.sh --steps 300 --out $D/run 2>&1 | q
echo "== B: resume to 400 with profiling, contiguous, per-rank"; NUM_RANKS=$R MASTER_PORT=2970$R bash launch/quickstart.sh --resume --steps 400 --dispatch per-rank --profile --out $D/run 2>&1 | q
.venv/bin/c2r-profile summarize $D/run | tail -3
echo "== plan on the first 70% of the profiled steps, predict on the held-out rest"
.venv/bin/c2r-place plan --traces $D/run --ranks $R --holdout 0.3 --out $D/plan.json 2>&1 | tail -4
echo "== apply"; .venv/bin/c2r-place apply --plan $D/plan.json --checkpoint $D/run/checkpoints --out $D/after/checkpoints 2>&1 | tail -2
echo "== C: resume to 500 with the plan, per-rank, profiling"; NUM_RANKS=$R MASTER_PORT=2970$R bash launch/quickstart.sh --resume --steps 500 --plan $D/plan.json --dispatch per-rank --profile --out $D/after 2>&1 | q
.venv/bin/c2r-profile summarize $D/after | tail -3
.venv/bin/c2r-profile dashboard $D/run $D/after -o $D/compare.html --names "contiguous,planned" | tail -1
