#!/usr/bin/env bash
# Several nodes with the deepspeed launcher and a hostfile (one line per node: "node-1 slots=8").
#   HOSTFILE=launch/hostfile.example NUM_NODES=2 GPUS_PER_NODE=8 EP_SIZE=8 bash launch/deepspeed_multinode.sh \
#       --steps 2000 --set model.moe.num_experts=64
# Hardware: NUM_NODES nodes with GPUS_PER_NODE GPUs each, passwordless ssh between them (the launcher uses pdsh),
# the same checkout and venv at the same path on every node. Expert-parallel groups are contiguous ranks, so with
# EP_SIZE <= GPUS_PER_NODE every all-to-all stays inside a node. Expected: rank 0 prints the progress bar and the
# losses; checkpoints land in --out (a shared filesystem). GPUS_PER_NODE defaults to the hostfile's smallest
# slots= (8 where it gives none). The launcher starts every node's ranks in the checkout: relative paths in the
# arguments (--data, --out, --plan) are read from there; HOSTFILE and BIN from the directory you call it from.
set -euo pipefail
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
HOSTFILE="$(absolute "${HOSTFILE:-hostfile}")"
[ -n "${BIN:-}" ] && BIN="$(absolute "$BIN")"
cd "$(dirname "$0")/.."
if [ ! -f "$HOSTFILE" ]; then
    echo "deepspeed_multinode.sh: hostfile '$HOSTFILE' not found; set HOSTFILE=path (see launch/hostfile.example)" >&2
    exit 2
fi
HOSTS="$(grep -v '^\s*\(#\|$\)' "$HOSTFILE" || true)"
if [ -z "$HOSTS" ]; then
    echo "deepspeed_multinode.sh: hostfile '$HOSTFILE' names no host (one line per node: \"node-1 slots=8\")" >&2
    exit 2
fi
BIN="${BIN:-.venv/bin}"
NUM_NODES="${NUM_NODES:-$(printf '%s\n' "$HOSTS" | wc -l)}"
SLOTS="$(printf '%s\n' "$HOSTS" | sed -n 's/.*slots=\([0-9][0-9]*\).*/\1/p' | sort -n | head -n 1)"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLOTS:-8}}"
EP_SIZE="${EP_SIZE:-$GPUS_PER_NODE}"
exec "$BIN/deepspeed" --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$GPUS_PER_NODE" \
    --master_port "${MASTER_PORT:-29500}" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} --module c2r.train --ep-size "$EP_SIZE" "$@"
