"""Plan file round trip and validation, input validation, holdout split, exports."""

import json

import numpy as np
import pytest
import torch

from placement.errors import PlacementError
from placement.export import autoep_descriptor, eplb_mapping, export_plan
from placement.inputs import (
    holdout_cutoff,
    load_coactivation_input,
    load_trace_input,
    routing_from_coactivation,
    validate_coactivation,
)
from placement.layout import ExpertLayout, layouts_from_rows
from placement.plan import load_plan, make_plan, plan_from_dict, save_plan
from profiling.trace import RoutingTraceRecorder, TraceConfig

E2R = np.array([[1, 0, 1, 0, 2, 3, 3, 2], [0, 0, 1, 1, 2, 2, 3, 3]])


def small_plan(**changes):
    plan = make_plan(
        layouts_from_rows(E2R, 4),
        num_nodes=2,
        method="kahypar",
        seed=0,
        inputs={"kind": "traces", "path": "x", "digest": "sha256:0", "tokens": 10, "holdout": None},
        layer_metrics={"predicted": [{"copies_per_token": 1.5}, {"copies_per_token": 1.7}]},
        overall={"predicted": {"copies_per_token": 1.6}},
        expert_load_LE=np.arange(16.0).reshape(2, 8),
    )
    plan.update(changes)
    return plan


def test_plan_round_trip(tmp_path):
    path = tmp_path / "plan.json"
    save_plan(small_plan(), path)
    plan = load_plan(path, num_layers=2, num_experts=8, num_ranks=4)
    assert np.array_equal([layout.expert_to_rank for layout in plan.layouts], E2R)
    assert (plan.num_layers, plan.num_experts, plan.num_ranks, plan.num_nodes) == (2, 8, 4, 2)
    assert plan.layouts[0].rank_to_experts == [[1, 3], [0, 2], [4, 7], [5, 6]]  # ascending: local-slot order
    assert plan.expert_load.shape == (2, 8)
    data = json.loads(path.read_text())
    assert data["format"] == "c2r-placement" and data["version"] == 1 and data["objective"] == "km1"
    assert data["layers"][1]["predicted"] == {"copies_per_token": 1.7}
    assert data["created"].endswith("+00:00")


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"version": 3}, "plan version 3; this c2r reads versions 1 and 2"),
        ({"format": "other"}, "not a c2r placement plan \\(format 'other'"),
        ({"num_ranks": 3}, r"ranks \(3\) must divide experts \(8\)"),
        ({"num_nodes": 3}, r"nodes \(3\) must divide ranks \(4\)"),
        ({"num_layers": 3}, r"layers must be numbered 0..2 once each"),
    ],
)
def test_bad_plan_documents(changes, message):
    with pytest.raises(PlacementError, match=message):
        plan_from_dict(small_plan(**changes))


def test_a_plan_whose_header_contradicts_its_layers_is_refused_and_layers_read_in_layer_order():
    """Validated before, wrong after: replicas under version 1 (an older reader misreads them), num_slots that is
    not the layers', layers of different slot counts. Layers listed out of order load by their numbers, and so does
    the per-layer data (export --replicas read the expert loads in file order: another layer's hot experts)."""
    twice = [[[r, (r + 1) % 4] for r in row] for row in E2R.tolist()]  # every expert on its rank and the next
    replicated = small_plan(version=2)
    for entry in replicated["layers"]:
        entry.pop("rank_to_experts")  # optional; make_plan wrote the unreplicated ones
    replicated["layers"][0]["expert_to_rank"] = twice[0]  # layer 1 keeps 8 slots
    with pytest.raises(PlacementError, match=r"different numbers of expert slots \[8, 16\]"):
        plan_from_dict(replicated)
    replicated["layers"][1]["expert_to_rank"] = twice[1]
    assert plan_from_dict(replicated).layouts[0].num_slots == 16
    with pytest.raises(PlacementError, match=r"have replicas, which need plan version 2 \(found 1\)"):
        plan_from_dict({**replicated, "version": 1})
    with pytest.raises(PlacementError, match="num_slots is 999 but its layers hold 16 slots"):
        plan_from_dict({**replicated, "num_slots": 999})
    reordered = small_plan()
    reordered["layers"] = reordered["layers"][::-1]
    plan = plan_from_dict(reordered)
    assert np.array_equal([layout.expert_to_rank for layout in plan.layouts], E2R)
    assert plan.expert_load.tolist() == np.arange(16.0).reshape(2, 8).tolist()


def test_plan_for_another_model_names_both_numbers(tmp_path):
    path = tmp_path / "plan.json"
    save_plan(small_plan(), path)
    with pytest.raises(PlacementError, match="plan for 8 experts, but 16 experts were expected"):
        load_plan(path, num_experts=16)
    with pytest.raises(PlacementError, match="plan for 4 ranks, but 2 ranks were expected"):
        load_plan(path, num_ranks=2)
    with pytest.raises(PlacementError, match="plan for 2 MoE layers, but 4 MoE layers were expected"):
        load_plan(path, num_layers=4)
    path.write_text("{not json")
    with pytest.raises(PlacementError, match="not a JSON plan file"):
        load_plan(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_plan(tmp_path / "missing.json")


def _with_layer(layer_changes):
    plan = small_plan()
    plan["layers"][0].update(layer_changes)
    return plan


@pytest.mark.parametrize(
    "layer_changes,message",
    [
        ({"expert_to_rank": [0, 0, 1, 1, 2, 2, 3]}, "rank for each of 8 experts; got 7 entries"),
        ({"expert_to_rank": [0, 0, 1, 1, 2, 2, 3, 7]}, r"names ranks \[7\] outside 0..3"),
        ({"expert_to_rank": [0, 0, 0, 1, 2, 2, 3, 3]}, r"exactly 2 experts .* these ranks hold: \{0: 3, 1: 1\}"),
        ({"expert_to_rank": [0, 0, 1, 1, 2, 2, 3, 3.5]}, r"non-integer ranks \[3.5\]"),
        ({"rank_to_experts": [[1, 1], [0, 2], [4, 7], [5, 6]]}, r"places experts \[1\] more than once"),
        ({"rank_to_experts": [[1, 3], [2, 0], [4, 7], [6, 5]]}, "local"),
    ],
)
def test_bad_layer_entries(layer_changes, message):
    plan = _with_layer(layer_changes)
    if message == "local":  # another order within a rank is still the same placement
        plan_from_dict(plan)
        return
    with pytest.raises(PlacementError, match=message):
        plan_from_dict(plan)


def test_layout_from_json_directly():
    # numpy arrays and lists read the same; the saved form is the plain list
    layout = ExpertLayout.from_json(np.array([1, 0, 0, 1]), 2, num_experts=4)
    assert layout == ExpertLayout.from_json([1, 0, 0, 1], 2) and layout.to_json() == [1, 0, 0, 1]
    with pytest.raises(PlacementError, match=r"ep_size \(3\) must divide num_experts \(4\)"):
        ExpertLayout.from_json([0, 1, 2, 0], 3, num_experts=4)
    with pytest.raises(PlacementError, match=r"layer 2 must list a rank for each of 4 experts; got 3 entries"):
        ExpertLayout.from_json([0, 1, 1], 2, num_experts=4, where="layer 2")
    assert layout.rank_to_experts == [[1, 2], [0, 3]]
    assert layout.physical_to_logical.tolist() == [1, 2, 0, 3] and layout.logical_to_physical.tolist() == [2, 0, 1, 3]
    assert layout.replica_slots.tolist() == [[2], [0], [1], [3]] and not layout.is_replicated


def test_replicated_layout():
    # expert 1 also on rank 1, expert 3 also on rank 0: 8 slots, 4 per rank, each rank's slots in ascending id
    layout = ExpertLayout.from_json([0, [0, 1], 1, [1, 0], 0, 1], 2, num_experts=6)
    assert layout.is_replicated and layout.num_slots == 8 and layout.experts_per_rank == 4
    assert layout.rank_to_experts == [[0, 1, 3, 4], [1, 2, 3, 5]]
    assert layout.physical_to_logical.tolist() == [0, 1, 3, 4, 1, 2, 3, 5]
    assert layout.logical_to_physical.tolist() == [0, 1, 5, 6, 3, 7]  # home copies
    assert layout.replica_slots.tolist() == [[0, -1], [1, 4], [5, -1], [6, 2], [3, -1], [7, -1]]
    assert ExpertLayout.from_json(layout.to_json(), 2) == layout and layout.to_json() == [0, [0, 1], 1, [1, 0], 0, 1]
    assert ExpertLayout.with_replicas(ExpertLayout.from_json([0, 0, 1, 1, 0, 1], 2), layout.replicas) == layout
    with pytest.raises(PlacementError, match=r"experts \[1\] have two copies on one rank"):
        ExpertLayout.from_json([0, [0, 0], 1, 1], 2)
    with pytest.raises(PlacementError, match=r"exactly 3 experts \(6 slots / ep_size 2\); these ranks hold: \{0: 2"):
        ExpertLayout.from_json([0, [1], 1, 1, [0, 1]], 2)
    with pytest.raises(PlacementError, match="an expert's list of ranks is empty"):
        ExpertLayout.from_json([[], 0], 2)
    with pytest.raises(PlacementError, match=r"export does not handle replicated experts yet \(experts \[1, 3\]"):
        layout.require_unreplicated("c2r-place export")


@pytest.mark.parametrize(
    "matrix,message",
    [
        (np.ones((4, 5)), r"square \[E, E\] slices; got shape \[4, 5\]"),
        (np.ones((2, 3, 4)), r"got shape \[2, 3, 4\]"),
        (np.array([[0, 1], [2, 0]]), r"not symmetric: layer 0 \[0, 1\] = 1 but \[1, 0\] = 2"),
        (np.array([[0, -1], [-1, 0]]), r"negative counts, e.g. layer 0 \[0, 1\] = -1"),
        (np.array([[0, 0.5], [0.5, 0]]), "integer token counts"),
    ],
)
def test_bad_coactivation_matrices(matrix, message):
    with pytest.raises(PlacementError, match=message):
        validate_coactivation(matrix)


def test_coactivation_files(tmp_path):
    counts = np.array([[3, 2, 1, 0], [2, 3, 0, 1], [1, 0, 2, 1], [0, 1, 1, 2]])  # 5 top-2 tokens
    np.save(tmp_path / "c.npy", counts)
    inp = load_coactivation_input(tmp_path / "c.npy")
    assert inp.num_layers == 1 and inp.num_experts == 4 and inp.plan_routings[0].num_tokens == 5
    assert inp.info["kind"] == "coactivation" and inp.info["digest"].startswith("sha256:")
    np.savez(tmp_path / "c.npz", coactivation=counts[None], tokens=np.array([7]))
    assert load_coactivation_input(tmp_path / "c.npz").plan_routings[0].num_tokens == 7
    with pytest.raises(PlacementError, match="--holdout needs per-token traces"):
        load_coactivation_input(tmp_path / "c.npy", holdout=0.5)
    assert routing_from_coactivation(counts).sets_MK.tolist() == [[0, 1], [0, 2], [1, 3], [2, 3]]


def write_traces(path, steps=4, tokens=50, num_layers=2, num_experts=8, top_k=2):
    """Step s routes tokens to experts chosen from a step-specific pattern, so a split by step is visible."""
    recorder = RoutingTraceRecorder(
        path,
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        source="test",
        config=TraceConfig(shard_rows=64),
    )
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        recorder.step = step
        for layer in range(num_layers):
            ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
            recorder.record(layer, ids)
    recorder.close()


def test_holdout_holds_out_the_latest_steps(tmp_path):
    write_traces(tmp_path / "t", steps=5, tokens=20)
    inp = load_trace_input(tmp_path / "t", holdout=0.4, progress=False)
    assert inp.info["holdout"] == {"fraction": 0.4, "first_held_out_step": 3, "plan_tokens": 120, "eval_tokens": 80}
    assert [r.num_tokens for r in inp.plan_routings] == [60, 60]
    assert [r.num_tokens for r in inp.eval_routings] == [40, 40]
    assert holdout_cutoff([np.array([0, 0, 1, 2, 3, 3])], 0.25) == 3
    assert holdout_cutoff([np.array([0, 9])], 0.9) == 9  # at least one step on each side
    with pytest.raises(PlacementError, match="at least 2 training steps"):
        holdout_cutoff([np.array([4, 4])], 0.5)
    with pytest.raises(PlacementError, match=r"fraction in \(0, 1\); got 1.5"):
        holdout_cutoff([np.array([0, 1])], 1.5)


def test_trace_input_accepts_run_profile_and_trace_dirs(tmp_path):
    write_traces(tmp_path / "run" / "profile" / "traces", steps=1, tokens=5)
    for p in (tmp_path / "run", tmp_path / "run" / "profile", tmp_path / "run" / "profile" / "traces"):
        inp = load_trace_input(p, progress=False)
        assert inp.num_layers == 2 and inp.info["tokens"] == 10
    with pytest.raises(FileNotFoundError, match="no routing traces in"):
        load_trace_input(tmp_path, progress=False)


def test_exports():
    plan = plan_from_dict(small_plan())
    eplb = eplb_mapping(plan.layouts)
    assert eplb["phy2log"][0].tolist() == [1, 3, 0, 2, 4, 7, 5, 6]
    assert all(eplb["phy2log"][0][eplb["log2phy"][0, e, 0]] == e for e in range(8))
    assert eplb["logcnt"].tolist() == [[1] * 8] * 2
    descriptor = autoep_descriptor(plan.layouts[0])
    assert descriptor == {
        "version": 1,
        "num_experts": 8,
        "ep_size": 4,
        "ranks": [
            {"rank": 0, "experts": [1, 3]},
            {"rank": 1, "experts": [0, 2]},
            {"rank": 2, "experts": [4, 7]},
            {"rank": 3, "experts": [5, 6]},
        ],
    }
    autoep_affine = pytest.importorskip("deepspeed.checkpoint.autoep_affine")
    for entry in export_plan(plan, "autoep")["layers"]:
        autoep_affine.validate_autoep_placement_descriptor(entry["expert_placement"])
    replicated = export_plan(plan, "eplb", num_replicas=12)
    assert replicated["num_physical_experts"] == 12 and sum(replicated["logcnt"][0]) == 12
    with pytest.raises(PlacementError, match="unknown export format 'x'"):
        export_plan(plan, "x")
