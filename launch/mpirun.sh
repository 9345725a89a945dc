#!/usr/bin/env bash
# MPI launch: mpirun starts the ranks and DeepSpeed finds them through mpi4py (auto_mpi_discovery).
#   NP=2 EP_SIZE=2 bash launch/mpirun.sh --steps 100                      (this machine)
#   NP=16 EP_SIZE=8 MPI_ARGS="--hostfile hosts -npernode 8" MASTER_ADDR=node-1 bash launch/mpirun.sh
# Hardware: OpenMPI and mpi4py (Debian: apt-get install openmpi-bin libopenmpi-dev; pip install mpi4py; or
# `make mpi`). On CPUs each rank is a process over gloo; on GPUs one rank per GPU over NCCL. Expected: the same
# output as launch/quickstart.sh.
# Relative paths in the arguments (--data, --out, --plan) are read from the directory you call it from (OpenMPI
# starts every rank there, on other nodes too).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/.venv/bin}"
NP="${NP:-2}"
EP_SIZE="${EP_SIZE:-$NP}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
ROOT_ARGS=()
[ "$(id -u)" = 0 ] && ROOT_ARGS=(--allow-run-as-root)
# DeepSpeed's mpi4py discovery takes rank 0's first `hostname -I` address as the rendezvous. Where that is not the
# network the ranks share (the loopback test cluster, a management interface listed first), set MASTER_ADDR: the
# ranks then take their ranks from OpenMPI's environment and meet at MASTER_ADDR:MASTER_PORT.
RANK_FROM_OMPI=()
if [ -n "${MASTER_ADDR:-}" ]; then
    export MASTER_ADDR MASTER_PORT="${MASTER_PORT:-29500}"
    RANK_FROM_OMPI=(-x MASTER_ADDR -x MASTER_PORT bash -c 'RANK=$OMPI_COMM_WORLD_RANK WORLD_SIZE=$OMPI_COMM_WORLD_SIZE \
        LOCAL_RANK=$OMPI_COMM_WORLD_LOCAL_RANK LOCAL_WORLD_SIZE=$OMPI_COMM_WORLD_LOCAL_SIZE exec "$@"' c2r-train)
fi
# shellcheck disable=SC2086
exec mpirun "${ROOT_ARGS[@]}" --oversubscribe -np "$NP" ${MPI_ARGS:-} -x OMP_NUM_THREADS -x PATH \
    "${RANK_FROM_OMPI[@]}" "$BIN/python" -m c2r.train --ep-size "$EP_SIZE" "$@"
