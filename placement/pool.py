"""Layers in parallel: the planner's per-layer work (partition, load cap, replicas) over a process pool
(``c2r-place plan --jobs N``).

Layers are independent and every step of a layer's plan is deterministic given the seed, so a pool changes the
wall time and nothing else: results come back in layer order, equal to one process's (tests/test_placement_load.py
checks it). Why processes, not threads: the per-layer work is numpy on small arrays and Python loops, which hold
the GIL. Why "spawn": Mt-KaHyPar runs a TBB thread pool and reading traces starts Arrow threads; a forked child of
a threaded parent can deadlock, a spawned one starts clean (about a second per worker to import numpy and scipy).
Each worker runs Mt-KaHyPar on one thread unless told otherwise (``--threads``), so N workers use N cores, not N^2.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from tqdm.auto import tqdm

from placement.errors import PlacementError

Result = TypeVar("Result")

# numpy / scipy BLAS pools in each worker: one thread each, as Mt-KaHyPar (set before the workers import numpy)
_ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# below this many experts a layer plans in well under a second, less than starting a worker costs
_PARALLEL_MIN_EXPERTS = 64


def check_jobs(jobs: int | None, num_layers: int, num_experts: int) -> int:
    """``--jobs``: None means `usable_cpus` where layers are worth a worker (2+ layers of 64+ experts), else 1;
    anything else must be an integer >= 1."""
    if jobs is None:
        return usable_cpus() if num_layers > 1 and num_experts >= _PARALLEL_MIN_EXPERTS else 1
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise PlacementError(f"--jobs must be an integer >= 1 (worker processes); got {jobs!r}")
    return jobs


def worker_threads(jobs: int, threads: int | None) -> int | None:
    """Mt-KaHyPar threads per worker: as asked (``--threads``), else one per worker when layers run in parallel
    (None: one process, Mt-KaHyPar takes every core as before)."""
    return threads if threads is not None or jobs <= 1 else 1


def map_layers(
    fn: Callable[..., Result],
    args_per_layer: Sequence[tuple[Any, ...]],
    jobs: int = 1,
    progress: bool = False,
    desc: str = "",
) -> list[Result]:
    """``[fn(*args) for args in args_per_layer]``, over ``jobs`` spawned worker processes when jobs > 1 (``fn``
    and its arguments must pickle: a module-level function, or a `functools.partial` of one). Order is kept; the
    first worker error is raised here as it was raised there."""
    jobs = min(jobs, len(args_per_layer))
    bar = tqdm(total=len(args_per_layer), desc=desc, unit="layer", disable=not progress)
    if jobs <= 1:
        out = []
        for args in args_per_layer:
            out.append(fn(*args))
            bar.update()
        bar.close()
        return out
    saved = {name: os.environ.get(name) for name in _ONE_THREAD}
    os.environ.update(_ONE_THREAD)  # inherited by the spawned workers only: this process's pools already exist
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(fn, *args) for args in args_per_layer]
            try:
                for future in as_completed(futures):
                    future.result()  # the first error, at once
                    bar.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # not the layers that have not started
                raise
            return [future.result() for future in futures]
    finally:
        bar.close()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
