#!/usr/bin/env bash
# Single node, the demo: the MoE GPT on the embedded corpus, 2 ranks, experts split over both (ep_size 2).
#   bash launch/quickstart.sh [extra c2r-train args]          (NUM_RANKS=4 EP_SIZE=4 bash launch/quickstart.sh)
# Hardware: any machine. On a CPU-only machine the ranks are CPU processes talking over gloo; on a GPU machine,
# one rank per GPU over NCCL. Expected (2 CPU cores, ~2 minutes): train and validation loss falling from ~5.2 to
# ~2.1 over 300 steps, checkpoints with one file per expert in runs/demo/checkpoints/.
# Relative paths in the arguments (--data, --out, --plan) are read from the directory you call it from.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/.venv/bin}"
NUM_RANKS="${NUM_RANKS:-2}"
EP_SIZE="${EP_SIZE:-$NUM_RANKS}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Ctrl-C: the ranks stop at the next step boundary with a checkpoint (c2r/stops.py) and the deepspeed launcher's
# per-node process forwards it; its outer runner would only print a KeyboardInterrupt traceback, so it ignores it.
trap '' INT
exec "$BIN/deepspeed" --num_gpus "$NUM_RANKS" --master_port "${MASTER_PORT:-29500}" \
    --module c2r.train --ep-size "$EP_SIZE" "$@"
