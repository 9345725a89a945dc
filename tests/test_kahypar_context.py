"""The planner's Mt-KaHyPar context (`placement.kahypar_context`): the deterministic preset with coarsening for a few
hundred experts, equal to the installed preset when the two changes are reverted, deterministic at any thread
count, better than the preset where the preset cannot coarsen, and a fallback where Mt-KaHyPar refuses it."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from placement import kahypar_context, methods
from placement.inputs import routing_from_expert_ids
from placement.kahypar_context import MULTILEVEL, context_for, multilevel_ini
from placement.objective import km1
from placement.synthetic import synthetic_expert_ids

REPO = Path(__file__).resolve().parents[1]


def routing(num_experts, top_k, tokens, clusters, seed=1):
    ids = synthetic_expert_ids(
        tokens, num_experts, top_k, num_clusters=clusters, zipf=0.3, cluster_bonus=3.0, seed=seed
    )
    return routing_from_expert_ids(ids, num_experts)


def partition_with(layer, num_parts, context):
    mt, initializer = methods._mtkahypar(1)
    mt.set_seed(0)
    context.logging = False
    context.set_partitioning_parameters(num_parts, 0.0, mt.Objective.KM1)
    edges, weights = methods._hyperedges(layer)
    hypergraph = initializer.create_hypergraph(
        context, layer.num_experts, len(edges), edges, [1] * layer.num_experts, weights
    )
    partitioned = hypergraph.partition(context)
    return np.asarray(partitioned.get_partition()), partitioned.km1()


@pytest.mark.parametrize("num_experts,top_k,num_parts", [(64, 8, 8), (32, 4, 4)])
def test_reverted_options_partition_exactly_as_the_deterministic_preset(num_experts, top_k, num_parts):
    # our ini with the preset's contraction limit (160) and runs (20) is the installed deterministic preset: a
    # Mt-KaHyPar whose preset changed fails here
    mt, initializer = methods._mtkahypar(1)
    layer = routing(num_experts, top_k, 2000, clusters=num_parts)
    preset = partition_with(
        layer, num_parts, context_for(mt, initializer, "deterministic", layer.num_experts, num_parts)
    )
    reverted = context_for(mt, initializer, MULTILEVEL, layer.num_experts, num_parts, ini_text=multilevel_ini(160, 20))
    ours = partition_with(layer, num_parts, reverted)
    assert np.array_equal(preset[0], ours[0]) and preset[1] == ours[1]


def test_reverted_options_are_the_deterministic_preset_option_for_option(capfd):
    # every option, not only those the partitions above exercise (coarsening and Jet never run at their sizes)
    mt, initializer = methods._mtkahypar(1)
    printed = []
    for context in (
        context_for(mt, initializer, "deterministic", 256, 8),
        context_for(mt, initializer, MULTILEVEL, 256, 8, ini_text=multilevel_ini(160, 20)),
        context_for(mt, initializer, MULTILEVEL, 256, 8),
    ):
        context.set_partitioning_parameters(8, 0.0, mt.Objective.KM1)
        capfd.readouterr()
        context.print_configuration()
        printed.append(capfd.readouterr().out)
    assert "Contraction Limit Multiplier:       160" in printed[0] and printed[0] == printed[1]
    changed = [(a, b) for a, b in zip(printed[0].splitlines(), printed[2].splitlines()) if a != b]
    assert [" ".join(b.split()) for _, b in changed] == [
        "Contraction Limit Multiplier: 4",
        "Number of Runs: 10",
    ], changed


def test_multilevel_beats_the_preset_where_the_preset_cannot_coarsen():
    # 256 experts into 8 parts: under the preset's contraction limit (160 x 8), so the preset never coarsens
    layer = routing(256, 8, 4000, clusters=32)
    preset = km1(layer, methods.partition_kahypar(layer, 8, preset="deterministic", threads=1))
    ours = km1(layer, methods.partition_kahypar(layer, 8, threads=1))
    assert ours < 0.99 * preset  # measured 13888 vs 14413


def test_the_seed_gives_other_plans_and_the_same_plan_again():
    # Mt-KaHyPar's presets ignore mtkahypar.set_seed (always seed 0); the options file carries the plan's seed
    layer = routing(256, 8, 4000, clusters=32)
    plans = [methods.partition_kahypar(layer, 8, seed=seed, threads=1) for seed in (0, 1, 2, 0)]
    assert np.array_equal(plans[0], plans[3])
    assert len({p.tobytes() for p in plans}) == 3  # measured KM1 13,888 / 13,878 / 13,948
    small = routing(64, 8, 2000, clusters=8)  # small parts too: the preset's values with the seed
    assert not np.array_equal(*(methods.partition_kahypar(small, 8, seed=seed, threads=1) for seed in (0, 3)))


def test_parts_of_a_handful_of_experts_keep_the_preset():
    # 64 experts into 8 parts (8 a part): coarsening would merge experts the local search keeps apart; at seed 0 the
    # plan is the preset's
    layer = routing(64, 8, 2000, clusters=8)
    ours = methods.partition_kahypar(layer, 8, threads=1)
    assert np.array_equal(ours, methods.partition_kahypar(layer, 8, preset="deterministic", threads=1))


def test_the_plan_is_the_same_at_any_thread_count():
    script = (
        "import sys, numpy as np; sys.path.insert(0, '.');"
        "from tests.test_kahypar_context import routing; from placement.methods import plan_layer;"
        "layer = routing(128, 8, 3000, clusters=16);"
        "print(plan_layer(layer, 16, 2, threads=int(sys.argv[1])).tolist())"
    )
    plans = {
        threads: subprocess.run(
            [sys.executable, "-c", script, str(threads)], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
        for threads in (1, 2)
    }
    assert plans[1] == plans[2] and plans[1].startswith("[")


def test_refused_options_fall_back_to_the_preset_with_one_warning(monkeypatch, caplog):
    # another Mt-KaHyPar's option names: the plan still comes, from its own deterministic preset, with one warning
    monkeypatch.setattr(
        kahypar_context,
        "multilevel_ini",
        lambda *args, **kwargs: multilevel_ini(*args, **kwargs) + "an-option-of-another-version=1\n",
    )
    kahypar_context._warn_fallback.cache_clear()
    layer = routing(64, 4, 1000, clusters=4)  # 16 experts a part: the multilevel options
    with caplog.at_level(logging.WARNING, logger="placement.kahypar_context"):
        fallback = [methods.partition_kahypar(layer, 4, threads=1) for _ in range(2)]
    preset = methods.partition_kahypar(layer, 4, preset="deterministic", threads=1)
    assert all(np.array_equal(x, preset) for x in fallback)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "an-option-of-another-version" in warnings[0] and "\x1b" not in warnings[0]


def test_unknown_preset_is_one_clear_error():
    with pytest.raises(methods.PlacementError, match=f"unknown Mt-KaHyPar preset 'fast'.*{MULTILEVEL}"):
        methods.partition_kahypar(routing(16, 2, 100, clusters=2), 2, preset="fast")
