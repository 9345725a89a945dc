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
256 experts on 64 ranks of 8 nodes (the node level: 32 experts a part): uncapped plans 1.0-1.2% fewer copies per
token held out, in two thirds of the time per layer (the node-level partition alone in half); the capped and
replicated plans at that scale keep their copies and load (6.802 and 6.679 copies per token, as before) and gain the
time. But with the new options on 64 experts into 8 ranks (8 a part) the trained OLMoE trace got +0.8% copies
uncapped and +2.1% at the 1.10 cap (the random-router OLMoE +1.7% uncapped; the synthetic trace -1.4%): where parts
hold a handful of experts, coarsening merges experts the local search would keep apart, so parts of fewer than
`MULTILEVEL_MIN_PER_PART` experts (a threshold between the measured 8, worse, and 32, better) keep the preset as it
is (its values, with the plan's seed: Mt-KaHyPar's presets always run with seed 0, since ``mtkahypar.set_seed`` does
not reach their deterministic algorithms; with seed 0 it is the preset exactly). Deterministic either way: the same
plan for a seed at any thread count (the preset's deterministic coarsener, initial partitioner and Jet; checked by
hand on 1, 2 and 4 threads, by the tests on 1 and 2); other seeds give other plans (256 experts into 8 parts, seeds
0-3: KM1 13,829-13,948), so ``--seed`` can be used to look for a better one.

The context is read from an ini file, Mt-KaHyPar's only way to set options its Python API does not expose (a
temporary file per call). `tests/test_kahypar_context.py` checks that the file with the two changes reverted is the
installed ``deterministic`` preset, option for option (Mt-KaHyPar's printed configuration) and in its partitions, so
that a Mt-KaHyPar whose preset moved is noticed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import re
import tempfile
from types import MappingProxyType
from typing import Any

from placement.errors import PlacementError

log = logging.getLogger(__name__)

MULTILEVEL = "deterministic_multilevel"
KAHYPAR_PRESETS = (MULTILEVEL, "deterministic", "default", "quality", "highest_quality")
DEFAULT_PRESET = MULTILEVEL

CONTRACTION_LIMIT_MULTIPLIER = 4  # the preset's 160 never coarsens a layer of a few hundred experts
INITIAL_PARTITIONING_RUNS = 10  # the preset's 20: no better plans on the coarse hypergraph, twice the time
MULTILEVEL_MIN_PER_PART = 16  # experts per part from which coarsening is used (32: -1.2% copies; 8: +0.8% to +2.1%)

# Mt-KaHyPar 1.7's deterministic preset as options of its ini format ("c-t" and "i-runs" are changed by
# `multilevel_ini`); the order follows Mt-KaHyPar's own grouping: general, preprocessing, coarsening, initial
# partitioning, refinement
_DETERMINISTIC_PRESET = MappingProxyType(
    {
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
)


def multilevel_ini(
    contraction_limit_multiplier: int = CONTRACTION_LIMIT_MULTIPLIER,
    runs: int = INITIAL_PARTITIONING_RUNS,
    seed: int = 0,
) -> str:
    """The ``deterministic_multilevel`` options as ini text (with 160 and 20: the ``deterministic`` preset, which
    always runs with seed 0: ``mtkahypar.set_seed`` does not reach its deterministic algorithms, the option does)."""
    options = {**_DETERMINISTIC_PRESET, "c-t": contraction_limit_multiplier, "i-runs": runs, "seed": seed}
    return "".join(f"{key}={value}\n" for key, value in options.items())


def mtkahypar_version() -> str | None:
    """The installed Mt-KaHyPar's version (None: not installed); plan files record it beside the preset, since a
    Mt-KaHyPar that refused our options planned with its own preset (`context_for`)."""
    try:
        return importlib.metadata.version("mtkahypar")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_preset(preset: str) -> None:
    if preset not in KAHYPAR_PRESETS:
        raise PlacementError(f"unknown Mt-KaHyPar preset {preset!r}; choose from {', '.join(KAHYPAR_PRESETS)}")


def context_for(
    mt: Any,
    initializer: Any,
    preset: str,
    num_vertices: int,
    num_parts: int,
    seed: int = 0,
    ini_text: str | None = None,
) -> Any:
    """Mt-KaHyPar's context of ``preset`` for ``num_vertices`` experts into ``num_parts`` (module docstring)
    (``mt``: the mtkahypar module, ``initializer``: its `initialize` result); ``ini_text``: these options instead
    (tests). ``deterministic_multilevel`` runs with ``seed`` (Mt-KaHyPar's own presets with seed 0 whatever it is:
    `multilevel_ini`). A Mt-KaHyPar that refuses the ``deterministic_multilevel`` options (another version's option
    names) gets its own ``deterministic`` preset, with one warning per process."""
    check_preset(preset)
    if preset != MULTILEVEL and ini_text is None:
        return initializer.context_from_preset(getattr(mt.PresetType, preset.upper()))
    refusable = ini_text is None  # our own options may be refused by another version; a test's must not be
    if refusable:
        if num_vertices >= MULTILEVEL_MIN_PER_PART * num_parts:
            ini_text = multilevel_ini(seed=seed)
        else:  # small parts: the preset's own values, with the seed (module docstring)
            ini_text = multilevel_ini(_DETERMINISTIC_PRESET["c-t"], _DETERMINISTIC_PRESET["i-runs"], seed)
    # a file per call, gone when the context is read: Mt-KaHyPar reads options from files only, and a file kept for
    # the process could be cleaned away under a long run (the context would then fall back for the wrong reason)
    with tempfile.NamedTemporaryFile("w", prefix="c2r-mtkahypar-", suffix=".ini") as options:
        options.write(ini_text)
        options.flush()
        try:
            return initializer.context_from_file(options.name)
        except mt.InvalidParameterError as error:
            if not refusable:
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
