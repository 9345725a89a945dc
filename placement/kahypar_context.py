"""Mt-KaHyPar contexts: its own presets, and ``deterministic_multilevel``, the planner's default.

Why a context of our own. Mt-KaHyPar's presets are tuned for hypergraphs of thousands to millions of vertices: they
coarsen only down to a contraction limit of 160 x k vertices. An MoE layer has a few hundred experts (vertices), so
at 256 experts into 8 nodes (limit 1280) there is no multilevel work at all: the result is the initial recursive
bipartitioning (20 runs of every initial algorithm per bisection) and its FM rounds, and Jet, the refinement that
runs while uncoarsening, never runs. ``deterministic_multilevel`` is, where a part gets at least
`MULTILEVEL_MIN_PER_PART` experts, Mt-KaHyPar's ``deterministic`` preset (the same options and values,
`_DETERMINISTIC_PRESET`, read from version 1.7's preset) with two changes:
- contraction limit 4 x k (``c-t=4``): 256 experts into 8 parts coarsen to 32 clusters, then uncoarsen with Jet;
- 10 initial partitioning runs (``i-runs=10``) instead of 20: on the coarse hypergraph fewer runs find as good a
  start;
and elsewhere the ``deterministic`` preset itself. Measured (2026-12-02, docs/placement.md "Mt-KaHyPar context"):
256 experts on 64 ranks of 8 nodes (the node level: 32 experts a part): 1.0-1.2% fewer copies per token held out in
about half the time; but 64 experts on 8 ranks (8 a part) of the trained OLMoE trace: +0.8% copies uncapped, +2.1%
at the 1.10 cap (the random-router OLMoE +1.7% uncapped; the synthetic trace -1.4%): where parts hold a handful of
experts, coarsening merges experts the local search would keep apart, so small parts keep the preset as it is.
Deterministic either way: the same plan for a seed at any thread count (the preset's deterministic coarsener,
initial partitioner and Jet; checked on 1, 2 and 4 threads).

The context is read from an ini file, Mt-KaHyPar's only way to set options its Python API does not expose; the file
is written once per process. `tests/test_kahypar_context.py` checks that the file with the two changes reverted
partitions exactly as the installed ``deterministic`` preset (so that a Mt-KaHyPar whose preset moved is noticed).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import tempfile
from pathlib import Path

from placement.errors import PlacementError

log = logging.getLogger(__name__)

MULTILEVEL = "deterministic_multilevel"
KAHYPAR_PRESETS = (MULTILEVEL, "deterministic", "default", "quality", "highest_quality")
DEFAULT_PRESET = MULTILEVEL

CONTRACTION_LIMIT_MULTIPLIER = 4  # the preset's 160 never coarsens a layer of a few hundred experts
INITIAL_PARTITIONING_RUNS = 10  # the preset's 20: no better plans on the coarse hypergraph, twice the time
MULTILEVEL_MIN_PER_PART = 16  # experts per part from which coarsening pays (32: -1.2% copies; 8: +0.8% to +2.1%)

# Mt-KaHyPar 1.7's deterministic preset as options of its ini format ("c-t" and "i-runs" are changed by
# `multilevel_ini`); the order follows Mt-KaHyPar's own grouping: general, preprocessing, coarsening, initial
# partitioning, refinement
_DETERMINISTIC_PRESET: dict[str, object] = {
    "mode": "direct",
    "preset-type": "deterministic",
    "deterministic": "true",
    "maxnet-removal-factor": 0.01,
    "smallest-maxnet-threshold": 50000,
    "maxnet-ignore": 1000,
    "num-vcycles": 0,
    "s-use-localized-random-shuffle": "false",
    "s-static-balancing-work-packages": 128,
    "p-enable-community-detection": "true",
    "p-louvain-edge-weight-function": "hybrid",
    "p-max-louvain-pass-iterations": 5,
    "p-louvain-min-vertex-move-fraction": 0.01,
    "p-vertex-degree-sampling-threshold": 200000,
    "p-louvain-low-memory-contraction": "true",
    "p-num-sub-rounds": 16,
    "c-type": "deterministic_multilevel_coarsener",
    "c-use-adaptive-edge-size": "false",
    "c-resolve-swaps": "true",
    "c-min-shrink-factor": 1.01,
    "c-max-shrink-factor": 2.5,
    "c-s": 1,
    "c-t": 160,
    "c-vertex-degree-sampling-threshold": 200000,
    "c-num-sub-rounds": 3,
    "c-rating-score": "heavy_edge",
    "c-rating-heavy-node-penalty": "no_penalty",
    "c-rating-acceptance-criterion": "best_prefer_unmatched",
    "i-mode": "rb",
    "i-runs": 20,
    "i-use-adaptive-ip-runs": "false",
    "i-perform-refinement-on-best-partitions": "false",
    "i-fm-refinement-rounds": 3,
    "i-lp-maximum-iterations": 20,
    "i-lp-initial-block-size": 5,
    "i-r-refine-until-no-improvement": "false",
    "i-r-rebalancer-type": "deterministic",
    "i-r-lp-type": "deterministic",
    "i-r-lp-maximum-iterations": 5,
    "i-r-sync-lp-sub-rounds": 1,
    "i-r-lp-he-size-activation-threshold": 100,
    "i-r-sync-lp-active-nodeset": "true",
    "i-r-fm-type": "do_nothing",
    "i-population-size": 64,
    "r-refine-until-no-improvement": "false",
    "r-rebalancer-type": "deterministic",
    "r-max-det-rebalancing-rounds": 0,
    "r-det-rebalancing-deadzone": 0.1,
    "r-det-rebalancing-heavy-vertex-exclusion": 1.5,
    "r-lp-type": "do_nothing",
    "r-lp-maximum-iterations": 5,
    "r-sync-lp-sub-rounds": 1,
    "r-lp-he-size-activation-threshold": 100,
    "r-sync-lp-active-nodeset": "true",
    "r-jet-type": "deterministic",
    "r-jet-num-iterations": 8,
    "r-jet-relative-improvement-threshold": 0.001,
    "r-jet-dynamic-rounds": 3,
    "r-jet-initial-negative-gain": 0.75,
    "r-jet-final-negative-gain": 0.0,
    "r-fm-type": "do_nothing",
    "r-flow-algo": "do_nothing",
}


def multilevel_ini(
    contraction_limit_multiplier: int = CONTRACTION_LIMIT_MULTIPLIER, runs: int = INITIAL_PARTITIONING_RUNS
) -> str:
    """The ``deterministic_multilevel`` options as ini text (with 160 and 20: the ``deterministic`` preset)."""
    options = {**_DETERMINISTIC_PRESET, "c-t": contraction_limit_multiplier, "i-runs": runs}
    return "".join(f"{key}={value}\n" for key, value in options.items())


@functools.cache
def _ini_path(text: str) -> str:
    """``text`` in a file of this process's, removed at exit (Mt-KaHyPar reads contexts from files only)."""
    fd, path = tempfile.mkstemp(prefix="c2r-mtkahypar-", suffix=".ini")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    atexit.register(Path(path).unlink, missing_ok=True)
    return path


def check_preset(preset: str) -> None:
    if preset not in KAHYPAR_PRESETS:
        raise PlacementError(f"unknown Mt-KaHyPar preset {preset!r}; choose from {', '.join(KAHYPAR_PRESETS)}")


def context_for(mt, initializer, preset: str, num_vertices: int, num_parts: int, ini_text: str | None = None):
    """A context of ``preset`` for ``num_vertices`` experts into ``num_parts`` (module docstring); ``ini_text``:
    these options instead (tests). A Mt-KaHyPar that refuses the ``deterministic_multilevel`` options (another
    version's option names) gets its own ``deterministic`` preset, with one warning per process."""
    check_preset(preset)
    if preset == MULTILEVEL and ini_text is None and num_vertices < MULTILEVEL_MIN_PER_PART * num_parts:
        preset = "deterministic"  # small parts: the preset as it is (module docstring)
    if preset != MULTILEVEL and ini_text is None:
        return initializer.context_from_preset(getattr(mt.PresetType, preset.upper()))
    try:
        return initializer.context_from_file(_ini_path(ini_text or multilevel_ini()))
    except (mt.InvalidParameterError, mt.InvalidInputError) as error:
        if ini_text is not None:
            raise
        _warn_fallback(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip())  # its messages carry colour codes
        return initializer.context_from_preset(mt.PresetType.DETERMINISTIC)


@functools.cache
def _warn_fallback(error: str) -> None:
    log.warning(
        "this Mt-KaHyPar refuses the %s options (%s); planning with its 'deterministic' preset instead (slower on a "
        "few hundred experts; the options are written for mtkahypar 1.7)",
        MULTILEVEL,
        error,
    )
