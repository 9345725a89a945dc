"""Replicated experts at run time: the copy rule against a plain loop, and replicated dispatch (every mode) against the
single-process reference, outputs and gradients, dropless counted."""

import shutil
from collections import Counter

import pytest
import torch

from c2r.experts import ExpertConfig, build_backend
from c2r.parallel import build_dispatcher, local_expert_weights, make_node_groups
from c2r.parallel.replicas import CopyChooser
from placement.layout import ExpertLayout
from tests.dispatch_cases import assert_ranks_match_reference, expert_inputs, run_rows
from tests.distributed import run_distributed
from tests.routing_cases import make_routing, random_routing
from tests.test_expert_parallel import MetaRecorder

T, D, F, E, K = 20, 16, 8, 8, 3


def naive_physical(expert_ids_TK, valid_TK, layout: ExpertLayout) -> list[list[int | None]]:
    """The copy rule, one (token, slot) at a time (None for empty slots)."""
    ranks_of, slots = layout.ranks_of_experts, layout.replica_slots
    free_seen = Counter()
    out = []
    for ids, valid in zip(expert_ids_TK.tolist(), valid_TK.tolist()):
        visited = {ranks_of[e][0] for e, v in zip(ids, valid) if v and len(ranks_of[e]) == 1}
        row = []
        for e, v in zip(ids, valid):
            copies = ranks_of[e]
            if not v:
                row.append(None)
                continue
            on_visited = [m for m, r in enumerate(copies) if r in visited]
            if on_visited:
                choice = on_visited[0]
            else:  # a free pair (always so for a single copy: its own rank is visited)
                choice = free_seen[e] % len(copies)
                free_seen[e] += 1
            row.append(int(slots[e][choice]))
        out.append(row)
    return out


# E = 8 experts; per layout its homes and replicas (extra ranks per expert).
LAYOUTS = {
    # 2 ranks, 5 slots each: hot expert 0 also on rank 1, expert 5 also on rank 0
    "two_ranks": (2, [0, 0, 0, 0, 1, 1, 1, 1], {0: (1,), 5: (0,)}),
    # 4 ranks, 3 slots each: hot expert 0 on every rank, expert 1 on two
    "hot_everywhere": (4, [3, 1, 0, 2, 1, 0, 3, 2], {0: (0, 1, 2), 1: (3,)}),
    # 4 ranks: rank 3 holds experts 6, 7 and a replica of 5, all idle in the "idle" routing: it receives nothing
    "rank3_idle": (4, [0, 0, 1, 1, 2, 2, 3, 3], {0: (1,), 1: (2,), 2: (0,), 5: (3,)}),
}


def make_layout(name: str) -> ExpertLayout:
    world, homes, extra = LAYOUTS[name]
    return ExpertLayout(tuple(homes), world, tuple(extra.get(e, ()) for e in range(E)))


def layout_routing(name: str, world: int):
    """Variable k (40% empty slots), expert 0 hot (every token's first slot), experts 5..7 idle for rank3_idle."""
    idle = 3 if name == "rank3_idle" else 0
    routing = random_routing(world * T, K, E, empty_fraction=0.4, idle_experts=idle, seed=7)
    ids = routing.expert_ids_TK.clone()
    hot = torch.rand(world * T, generator=torch.Generator().manual_seed(8)) < 0.6
    has_0 = (ids == 0).any(1)
    ids[:, 0] = torch.where(hot & ~has_0, 0, ids[:, 0])  # distinct experts per token still
    routing = make_routing(ids, routing.weights_TK, routing.valid_TK, E)
    return routing


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_copy_rule_matches_a_plain_loop(name):
    layout = make_layout(name)
    routing = layout_routing(name, layout.num_ranks)
    for rows in (slice(0, T), slice(T, 2 * T), slice(None)):  # per source rank, and a whole batch
        ids, valid = routing.expert_ids_TK[rows], routing.valid_TK[rows]
        got = CopyChooser(layout).physical(ids, valid).tolist()
        want = naive_physical(ids, valid, layout)
        for t, (g_row, w_row) in enumerate(zip(got, want)):
            for k, (g, w) in enumerate(zip(g_row, w_row)):
                if w is not None:
                    assert g == w, f"{name}: token {t} slot {k}: copy {g}, rule says {w}"
                # empty slots get some copy of their expert (never read)
                assert layout.physical_to_logical[g] == ids[t, k]
    # Unreplicated layouts map every expert to its only slot, as before.
    plain = ExpertLayout((1, 0, 1, 0, 0, 1, 1, 0), 2)
    torch.testing.assert_close(
        CopyChooser(plain).physical(routing.expert_ids_TK, routing.valid_TK),
        torch.tensor(plain.logical_to_physical)[routing.expert_ids_TK],
    )


def test_free_pairs_split_evenly_over_the_copies():
    # Every token routes only to expert 0 (copies on all 4 ranks): nothing is visited, so the n-th pair goes to
    # copy n mod 4: a quarter each.
    layout = make_layout("hot_everywhere")
    ids = torch.zeros(40, 1, dtype=torch.int64)
    physical = CopyChooser(layout).physical(ids, torch.ones(40, 1, dtype=torch.bool))
    assert Counter(physical.flatten().tolist()) == {int(s): 10 for s in layout.replica_slots[0]}


def world_cases(world: int) -> list[tuple[str, str, str]]:
    """(layout, dispatch mode, copy choice): every mode with the rule, and with copy_choice="balanced"."""
    names = [n for n, (w, _, _) in LAYOUTS.items() if w == world]
    modes = ["per-expert", "per-rank"] + (["per-node"] if world == 4 else [])
    return [(name, mode, choice) for name in names for mode in modes for choice in ("rule", "balanced")]


def balanced_physical(routing, layout: ExpertLayout, world: int) -> list[list[int | None]]:
    """copy_choice="balanced" per source rank, from placement/copy_choice.py's twin with the batch's counts (what
    the dispatchers all-reduce), as physical slots (None for empty slots)."""
    from placement.copy_choice import choose_balanced_copy_ranks

    ids = torch.where(routing.valid_TK, routing.expert_ids_TK, -1).numpy()
    count_E = torch.bincount(torch.from_numpy(ids[ids >= 0]), minlength=E).numpy()
    out = []
    for rank in range(world):
        src = ids[rank * T : (rank + 1) * T]
        dest = choose_balanced_copy_ranks(src, layout, count_E, rank)
        for row_ids, row_dest in zip(src.tolist(), dest.tolist()):
            slot_of = lambda e, r: int(layout.replica_slots[e][layout.ranks_of_experts[e].index(r)])  # noqa: E731
            out.append([slot_of(e, r) if e >= 0 else None for e, r in zip(row_ids, row_dest)])
    return out


def dispatch_worker(rank, world):
    full, x = expert_inputs(world * T, E, D, F)
    rows = slice(rank * T, (rank + 1) * T)
    node_groups = make_node_groups(2) if world == 4 else None  # 4 ranks as 2 nodes x 2
    backend = build_backend("torch", ExpertConfig(torch_impl="grouped_mm"))
    results = {}
    for name, mode, choice in world_cases(world):
        layout = make_layout(name)
        recorder = MetaRecorder()
        experts = local_expert_weights(full, layout.local_experts(rank))
        W = 2 if mode == "per-node" else None
        dispatcher = build_dispatcher(mode, layout, None, recorder, W, node_groups if W else None, copy_choice=choice)
        y, x_grad, w_grad = run_rows(dispatcher, x, layout_routing(name, world), backend, experts, rows)
        (meta,) = recorder.metas
        results[name, mode, choice] = {
            "y": y,
            "x_grad": x_grad,
            "w_grad": w_grad,
            "expert_grads": {n: p.grad for n, p in experts.named_parameters()},
            "local_experts": layout.local_experts(rank),
            "load_X": meta.tokens_per_local_expert_X.tolist(),
            "sent": sum(meta.send_splits),
            "distinct": int(meta.distinct_ranks),
            "network_rows": len(meta.token_idx_C),  # per-node stage 1: one row per (token, destination node)
            "distinct_nodes": int(meta.distinct_nodes),
        }
    if world == 2:  # group-limited routing groups experts by rank: a replicated layout is refused, by name
        from c2r.moe import MoEConfig, MoELayer
        from c2r.parallel import shard_experts
        from c2r.routing import RouterConfig

        router = RouterConfig(kind="group_limited")
        layer = MoELayer(D, MoEConfig(num_experts=E, top_k=2, ffn_hidden_size=F, router=router))
        try:
            shard_experts(layer, make_layout("two_ranks"))
        except ValueError as error:
            results["refusal"] = str(error)
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_replicated_dispatch_matches_unreplicated_reference(tmp_path, world):
    per_rank = run_distributed(dispatch_worker, world, tmp_path)
    if world == 2:
        assert per_rank[0]["refusal"] == (
            "router 'group_limited' groups experts by rank and cannot use a layout with replicated experts (MoE "
            "layer 0); use a plan without replicas, or another router"
        )
    full, x = expert_inputs(world * T, E, D, F)
    reference = build_backend("reference", ExpertConfig())
    for name, mode, choice in world_cases(world):
        layout = make_layout(name)
        routing = layout_routing(name, world)
        full.zero_grad(set_to_none=True)
        results = [r[name, mode, choice] for r in per_rank]
        where = f"{name}, {mode}, {choice}"
        # Every copy of every expert holds the whole expert's gradient (the sum over its copies' own gradients):
        # exactly what one unreplicated expert gets.
        assert_ranks_match_reference(results, run_rows(None, x, routing, reference, full), full, where)
        # Dropless, counted, and the rows went where the copy rule says (per source rank): load per physical slot.
        want_load = Counter()
        if choice == "balanced":
            for row in balanced_physical(routing, layout, world):
                want_load.update(p for p in row if p is not None)
        for rank in range(world if choice == "rule" else 0):
            src = slice(rank * T, (rank + 1) * T)
            for row in naive_physical(routing.expert_ids_TK[src], routing.valid_TK[src], layout):
                want_load.update(p for p in row if p is not None)
        got_load = [n for r in results for n in r["load_X"]]
        assert got_load == [want_load[p] for p in range(layout.num_slots)], where
        assert sum(got_load) == int(routing.valid_TK.sum()), where
        # Rows sent: one per pair (per-expert), per (token, rank it reaches) (per-rank), per (token, node) over the
        # network (per-node); what reaches a rank counts the copy the rule chose.
        sent = sum(r["sent"] for r in results)
        if mode == "per-expert":
            assert sent == sum(got_load), where
        elif mode == "per-rank":
            assert sent == sum(r["distinct"] for r in results), where
        else:
            assert all(r["network_rows"] == r["distinct_nodes"] for r in results), where
        if name == "rank3_idle":
            assert results[3]["load_X"] == [0, 0, 0], where  # rank 3 receives nothing, and still joins the backward
        if name == "hot_everywhere" and choice == "rule":
            assert all(results[rank]["load_X"][layout.local_experts(rank).index(0)] > 0 for rank in range(world))
        if choice == "balanced":  # the busiest rank no busier than under the rule (here it is less busy)
            rule = [r[name, mode, "rule"] for r in per_rank]
            assert max(sum(r["load_X"]) for r in results) <= max(sum(r["load_X"]) for r in rule), where


# Training under DeepSpeed (c2r-train's own train(), 2 CPU ranks): 2 MoE layers of 8 experts, each with 2 replicas.
REPLICATED_PLAN = [[[0, 1], 0, 0, 0, 1, [1, 0], 1, 1], [1, 0, [1, 0], [0, 1], 0, 1, 1, 0]]
# Other replicated experts than REPLICATED_PLAN's, on other homes: applying it creates and removes every replica.
OTHER_REPLICATED_PLAN = [[0, [1, 0], 0, 0, 1, 1, [0, 1], 1], [[0, 1], 1, 1, 0, [1, 0], 0, 1, 0]]


def write_replicated_plan(path, layouts=REPLICATED_PLAN) -> str:
    import json

    plan = {
        "format": "c2r-placement",
        "version": 2,  # a plan with replicas (placement/plan.py)
        "num_layers": 2,
        "num_experts": E,
        "num_ranks": 2,
        "layers": [{"layer": i, "expert_to_rank": layout} for i, layout in enumerate(layouts)],
    }
    path.write_text(json.dumps(plan))
    return str(path)


def train_worker(rank, world, raws):
    from c2r.config_utils import config_from_dict
    from c2r.train import RunConfig, train

    return [train(config_from_dict(RunConfig, raw))["step_losses"] for raw in raws]


def local_copies(model, rank: int) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """{(MoE layer, logical expert): its weights (w1, v1, w2) in this rank's slot} for every expert the rank holds."""
    from c2r.moe import MoELayer

    copies = {}
    for layer, moe in enumerate(m for m in model.modules() if isinstance(m, MoELayer)):
        names = [n for n in ("w1", "v1", "w2") if getattr(moe.experts, n) is not None]
        for slot, expert in enumerate(moe.dispatcher.layout.local_experts(rank)):
            copies[layer, expert] = {n: moe.experts.stacked(n)[slot].detach().clone() for n in names}
    return copies


def train_copies_worker(rank, world, raws):
    """Per run: its step losses and this rank's in-memory expert copies after the last step."""
    from c2r.config_utils import config_from_dict
    from c2r.train import RunConfig, train

    results = []
    for raw in raws:
        result = train(config_from_dict(RunConfig, raw))
        results.append((result["step_losses"], local_copies(result["engine"].module, rank)))
    return results


def first_step_norm_worker(rank, world, raws):
    """Per run: DeepSpeed's global gradient norm of the first step (the norm the clip coefficient uses). A run whose
    ``"uncorrected"`` is set keeps DeepSpeed's own norm, which counts every copy of a replicated expert."""
    import c2r.deepspeed.replica_norm as replica_norm
    from c2r.config_utils import config_from_dict
    from c2r.train import RunConfig, train

    norms = []
    for raw in raws:
        raw = dict(raw)
        if raw.pop("uncorrected", False):
            replica_norm.count_replicas_once = lambda engine: False  # build_engine imports it per call
        offload = raw.pop("offload", None)
        result = train(config_from_dict(RunConfig, raw))
        assert offload is None or result["engine"].optimizer.cpu_offload == offload
        norms.append(float(result["engine"].get_global_grad_norm()))
    return norms


@pytest.mark.parametrize(("stage", "offload"), [(1, False), (2, False), (2, True)])
def test_the_clipping_norm_counts_a_replicated_expert_once(tmp_path, stage, offload):
    """ZeRO 1/2 on the device, and ZeRO 2 with the optimizer offloaded to the host (DeepSpeed's norm is then summed
    from per-parameter norms; the correction reads the host's gradient partition)."""
    import json

    from tests.run_configs import tiny_run_config

    plan = write_replicated_plan(tmp_path / "plan.json")
    ds_config = tmp_path / "ds.json"
    zero = {"stage": stage, **({"offload_optimizer": {"device": "cpu"}} if offload else {})}
    # offload with torch's AdamW (c2r-train's), not DeepSpeed's JIT-built CPU Adam
    ds_config.write_text(
        json.dumps({"zero_optimization": zero, "bf16": {"enabled": False}, "zero_force_ds_cpu_optimizer": False})
    )

    def raw(name, **options):
        config = tiny_run_config(
            tmp_path / name, steps=1, ep_size=2, dispatch="per-rank", deepspeed_config=str(ds_config), **options
        )
        config["train"].update(save_last=False)
        return config

    runs = [raw("plain"), raw("replicas", placement_plan=plan), {**raw("raw", placement_plan=plan), "uncorrected": 1}]
    runs = [{**run, "offload": offload} for run in runs]
    plain, replicas, uncorrected = run_distributed(first_step_norm_worker, 2, tmp_path / "spawn", runs)[0]
    assert replicas == pytest.approx(plain, rel=1e-6)
    # DeepSpeed's own norm counts each of the 4 replicated experts' copies: off by more than the tolerance above.
    assert abs(uncorrected / plain - 1) > 3e-6


@pytest.mark.parametrize("bf16", [True, False])
def test_zero0_clipping_norm_is_the_whole_models_with_experts_sharded_and_replicated(tmp_path, bf16):
    """ZeRO 0 (bf16: DeepSpeed's unfused optimizer, whose own norm leaves the experts out; fp32: its clip_grad_norm_,
    which averages the ranks' norms): c2r's norm sums each rank's experts over the expert-parallel group and counts a
    replicated expert once, so it equals ZeRO 2's on the same gradients, with the experts sharded over 2 ranks and
    with replicas."""
    import json

    from tests.run_configs import tiny_run_config

    plan = write_replicated_plan(tmp_path / "plan.json")
    runs = []
    for stage in (0, 2):
        ds_config = tmp_path / f"ds{stage}.json"
        ds_config.write_text(json.dumps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}))
        for name, options in (("plain", {}), ("replicas", {"placement_plan": plan})):
            config = tiny_run_config(
                tmp_path / f"{name}{stage}", steps=1, ep_size=2, dispatch="per-rank", deepspeed_config=str(ds_config),
                **options,
            )  # fmt: skip
            config["train"].update(save_last=False)
            runs.append(config)
    zero0_plain, zero0_replicas, zero2_plain, zero2_replicas = run_distributed(
        first_step_norm_worker, 2, tmp_path / "spawn", runs
    )[0]
    assert zero0_plain == pytest.approx(zero2_plain, rel=1e-6)
    assert zero0_replicas == pytest.approx(zero2_replicas, rel=1e-6)


def saved_experts(tag_dir) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """{(layer, logical expert): its tensors (w1, v1, w2)} from the checkpoint's expert files, after checking that
    it holds exactly one weight file per logical expert: its home slot's (the run config's layouts say which)."""
    import json

    config = json.loads((tag_dir / "c2r_config.json").read_text())
    experts = {}
    for layer, saved in enumerate(config["expert_layouts"]):
        layout = ExpertLayout.from_json(saved, 2, E)
        homes = layout.logical_to_physical.tolist()
        files = sorted(p.name for p in tag_dir.glob(f"layer_{layer}_expert_*_model_states.pt"))
        assert files == sorted(f"layer_{layer}_expert_{p}_mp_rank_00_model_states.pt" for p in homes), tag_dir
        for expert, home in enumerate(homes):
            state = torch.load(tag_dir / f"layer_{layer}_expert_{home}_mp_rank_00_model_states.pt", weights_only=True)
            assert all(f"deepspeed_experts.{home}." in key for key in state), list(state)
            experts[layer, expert] = {key.rsplit(".", 1)[1]: value for key, value in state.items()}
    return experts


def test_replicas_train_like_the_unreplicated_model_under_deepspeed(tmp_path):
    import json

    from profiling.dashboard import build_dashboard, load_run
    from profiling.summary import summarize
    from tests.run_configs import tiny_run_config

    plan = write_replicated_plan(tmp_path / "plan.json")
    zero0 = tmp_path / "zero0.json"
    zero0.write_text(json.dumps({"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}}))

    def raw(name, **options):
        return tiny_run_config(tmp_path / name, steps=20, ep_size=2, dispatch="per-rank", **options)

    runs = {
        # ZeRO 2 (the CPU default) and 0, clipping off: the replicated run is the unreplicated one
        "zero2": raw("zero2", grad_clip=0.0),
        "zero2_replicas": raw("zero2_replicas", grad_clip=0.0, placement_plan=plan, profile=True),
        "zero0": raw("zero0", grad_clip=0.0, deepspeed_config=str(zero0)),
        "zero0_replicas": raw("zero0_replicas", grad_clip=0.0, deepspeed_config=str(zero0), placement_plan=plan),
        # copy_choice="balanced": other copies for the same pairs, the same function
        "zero2_balanced_replicas": raw(
            "zero2_balanced_replicas", grad_clip=0.0, placement_plan=plan, copy_choice="balanced"
        ),
        # clipping on: a replicated expert's gradient counts once per copy in the global norm (replicas.py)
        "clipped_replicas": raw("clipped_replicas", grad_clip=0.05, placement_plan=plan),
    }
    per_rank = run_distributed(train_copies_worker, 2, tmp_path / "spawn", list(runs.values()))
    losses = {name: run_losses for name, (run_losses, _) in zip(runs, per_rank[0])}
    for stage in ("zero2", "zero0"):
        torch.testing.assert_close(losses[f"{stage}_replicas"], losses[stage], rtol=1e-5, atol=1e-5, msg=stage)
    torch.testing.assert_close(losses["zero2_balanced_replicas"], losses["zero2"], rtol=1e-5, atol=1e-5)
    for index, name in enumerate(runs):
        copies = {}  # (layer, logical expert) -> its copies on the two ranks, after 20 steps
        for rank in range(2):
            for key, tensors in per_rank[rank][index][1].items():
                copies.setdefault(key, []).append(tensors)
        # The checkpoint holds each logical expert once (2 x 8 files, not 2 x 10 with replicas), equal to its copies.
        saved = saved_experts(tmp_path / name / "checkpoints" / "step20")
        assert len(saved) == 2 * E and saved.keys() == copies.keys(), name
        for key, tensors in saved.items():
            assert tensors.keys() == {"w1", "v1", "w2"} or tensors.keys() == {"w1", "w2"}
            for held in copies[key]:  # copies stay bit-identical over 20 steps, clipped or not
                for param, value in tensors.items():
                    assert torch.equal(held[param], value), f"{name} layer {key[0]} expert {key[1]} {param}"
        assert sum(len(c) > 1 for c in copies.values()) == (4 if "replicas" in name else 0), name
    # The run config and profile.json record the replicated layouts in the JSON form; the profiler counts physical
    # slots (each rank's local load has X = 5 entries) and the pairs it computed are the routed ones.
    saved = json.loads((tmp_path / "zero2_replicas" / "checkpoints" / "step20" / "c2r_config.json").read_text())
    assert saved["expert_layouts"] == REPLICATED_PLAN
    summary = summarize(tmp_path / "zero2_replicas")
    assert [layer["expert_to_rank"] for layer in summary["layers"]] == REPLICATED_PLAN
    for layer in summary["layers"]:  # per physical slot: 10 slots, adding up to each rank's load
        assert len(layer["slot_load"]) == 10
        assert [sum(layer["slot_load"][r * 5 : (r + 1) * 5]) for r in range(2)] == layer["rank_load"]
    # The dashboard reads the replicated form: homes for grouping, replicas marked, load per physical slot.
    run = load_run(tmp_path / "zero2_replicas")
    assert run.expert_to_rank(0) == [0, 0, 0, 0, 1, 1, 1, 1] and run.replicas(0)[0] == [1]
    assert run.slots(0)[:5] == [(0, False), (1, False), (2, False), (3, False), (5, True)]
    html = build_dashboard([run])
    assert "planned, 4 replicas" in html and "e5+ " in html and "per physical slot" in html
    records = [
        json.loads(line)
        for path in sorted((tmp_path / "zero2_replicas" / "profile" / "comm").glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    assert records and all(len(r["local_expert_load"]) == 5 for r in records)
    for step_layer in {(r["step"], r["layer"]) for r in records}:
        both = [r for r in records if (r["step"], r["layer"]) == step_layer]
        assert sum(sum(r["local_expert_load"]) for r in both) == sum(r["valid_slots"] for r in both)  # dropless


@pytest.mark.parametrize("stage", [2, 0])
def test_apply_creates_and_removes_replicas_and_resume_follows_the_uninterrupted_run(tmp_path, capsys, stage):
    import json

    from c2r.deepspeed.apply_plan import apply_plan
    from c2r.deepspeed.expert_files import expert_file_name, rename_slot, stored_slot
    from c2r.deepspeed.move_experts import REMAPPED
    from placement.plan import load_plan
    from tests.run_configs import tiny_run_config

    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": False}}))
    replicated = write_replicated_plan(tmp_path / "replicated.json")
    plain = tmp_path / "plain.json"  # no replicas, every expert on another rank than in the replicated plan's homes
    plain_layouts = [[1, 1, 1, 1, 0, 0, 0, 0], [0, 1, 0, 1, 1, 0, 0, 1]]
    plain.write_text(
        json.dumps(
            {
                **json.loads((tmp_path / "replicated.json").read_text()),
                "layers": [{"layer": i, "expert_to_rank": layout} for i, layout in enumerate(plain_layouts)],
            }
        )
    )

    def raw(name, steps, **options):
        return tiny_run_config(
            tmp_path / name,
            steps=steps,
            ep_size=2,
            eval_every=2,
            grad_clip=0.0,
            deepspeed_config=str(ds_config),
            **options,
        )

    def train_run(name, steps, **options):
        return run_distributed(train_worker, 2, tmp_path / f"spawn_{name}", [raw(name, steps, **options)])[0][0]

    # Uninterrupted: 6 steps, contiguous, checkpoints every 2. Moved at step 2: replicas created (each new copy gets
    # its home copy's weights and Adam moments), resumed to step 6. Its step-4 checkpoint moved again: replicas
    # removed and experts moved to other ranks, resumed to step 6. Same seed, batches and schedule as uninterrupted.
    full = train_run("full", 6, save_every=2)
    apply_plan(
        load_plan(replicated).layouts, tmp_path / "full" / "checkpoints", tmp_path / "rep" / "checkpoints", "step2"
    )
    moved = json.loads((tmp_path / "rep" / "checkpoints" / "step2" / "c2r_config.json").read_text())
    assert moved["expert_layouts"] == REPLICATED_PLAN and moved["optimizer_state"] == REMAPPED
    saved_experts(tmp_path / "rep" / "checkpoints" / "step2")  # apply writes one weight file per logical expert
    with_replicas = train_run("rep", 6, resume=True, placement_plan=replicated, save_every=2)
    rep4 = tmp_path / "rep" / "checkpoints" / "step4"
    saved_experts(rep4)  # and so does training (E files per layer, not 10)
    apply_plan(
        load_plan(str(plain)).layouts, tmp_path / "rep" / "checkpoints", tmp_path / "back" / "checkpoints", "step4"
    )
    moved = json.loads((tmp_path / "back" / "checkpoints" / "step4" / "c2r_config.json").read_text())
    assert moved["expert_layouts"] == plain_layouts and moved["optimizer_state"] == REMAPPED
    assert len(list((tmp_path / "back" / "checkpoints" / "step4").glob("layer_0_expert_*"))) == E
    # A replicated checkpoint as training saved it (one weight file per logical expert) resumes as it is, and takes
    # a plan with other replicas and homes (c2r-place apply: replica slots read from the home files).
    shutil.copytree(rep4, tmp_path / "again" / "checkpoints" / "step4")
    (tmp_path / "again" / "checkpoints" / "latest").write_text("step4")
    other = write_replicated_plan(tmp_path / "other.json", OTHER_REPLICATED_PLAN)
    apply_plan(load_plan(other).layouts, tmp_path / "rep" / "checkpoints", tmp_path / "other" / "checkpoints", "step4")
    saved_experts(tmp_path / "other" / "checkpoints" / "step4")
    # Checkpoints saved before, with a file per replica slot too, still resume (the replica files are not read).
    legacy = tmp_path / "legacy" / "checkpoints"
    shutil.copytree(rep4, legacy / "step4")
    (legacy / "latest").write_text("step4")
    for layer, layout in enumerate(load_plan(replicated).layouts):
        for slot in range(layout.num_slots):
            if (home := stored_slot(layout, slot)) != slot:
                state = torch.load(legacy / "step4" / expert_file_name(layer, home), weights_only=True)
                torch.save(rename_slot(state, slot), legacy / "step4" / expert_file_name(layer, slot))
    without, again, other_replicas, old_format = run_distributed(
        train_worker,
        2,
        tmp_path / "spawn_resumed",
        [
            raw("back", 6, resume=True, placement_plan=str(plain)),
            raw("again", 6, resume=True, placement_plan=replicated),
            raw("other", 6, resume=True, placement_plan=other),
            raw("legacy", 6, resume=True, placement_plan=replicated),
        ],
    )[0]
    torch.testing.assert_close(with_replicas, full[2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(without, full[4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, full[4:], rtol=1e-5, atol=1e-5)
    # bit for bit: the run that saved it went on alike under the same placement
    assert again == old_format == with_replicas[2:]
    torch.testing.assert_close(other_replicas, full[4:], rtol=1e-5, atol=1e-5)
    if stage == 2:
        # Without a logical expert's weight file (a replicated one: no replica file to fall back on either), apply
        # and --resume refuse in one line naming the expert and its file.
        broken = tmp_path / "broken" / "checkpoints"
        shutil.copytree(rep4, broken / "step4")
        (broken / "latest").write_text("step4")
        home = int(load_plan(replicated).layouts[1].logical_to_physical[2])
        (broken / "step4" / f"layer_1_expert_{home}_mp_rank_00_model_states.pt").unlink()
        want = (
            f"checkpoint {broken / 'step4'} has no weights for layer 1 expert 2 "
            f"(layer_1_expert_{home}_mp_rank_00_model_states.pt): incomplete or not a c2r checkpoint"
        )
        with pytest.raises(FileNotFoundError) as error:
            apply_plan(load_plan(other).layouts, broken, tmp_path / "nowhere", "step4")
        assert str(error.value) == want
        from c2r.place_cli import main as place_main

        capsys.readouterr()  # the progress bars of the applies above
        code = place_main(["apply", "--plan", other, "--checkpoint", str(broken), "--out", str(tmp_path / "no")])
        err = capsys.readouterr().err
        assert code == 2 and err.strip().splitlines() == [f"c2r-place apply: error: {want}"], err
        resume_broken = raw("broken", 6, resume=True, placement_plan=replicated)
        with pytest.raises(AssertionError, match="layer 1 expert 2"):
            run_distributed(train_worker, 2, tmp_path / "spawn_broken", [resume_broken])
    if stage == 2:  # c2r-place reshard collapses replicas: the replicated step-4 checkpoint on one rank (ep 1)
        from c2r.deepspeed.reshard import RESHARDED, reshard

        written = reshard(tmp_path / "rep" / "checkpoints", tmp_path / "one" / "checkpoints", 1, 1, tag="step4")
        saved = json.loads((written / "c2r_config.json").read_text())
        assert saved["optimizer_state"] == RESHARDED and saved["expert_layouts"] == [[0] * E] * 2
        raw_one = raw("one", 6, resume=True)
        raw_one["train"].update(ep_size=1, batch_size=8)  # the same global batch on one rank
        one = run_distributed(train_worker, 1, tmp_path / "spawn_one", [raw_one])[0][0]
        torch.testing.assert_close(one, full[4:], rtol=1e-5, atol=1e-5)


def test_replicas_with_expert_data_parallelism_zero1(tmp_path):
    # 4 ranks, ep_size 2: each expert slot also has an expert-data-parallel peer (ranks p and p + 2), over which
    # DeepSpeed averages its gradient after the copies' sum; ZeRO 1 shards the expert moments over those peers.
    import json

    from tests.run_configs import tiny_run_config

    plan = write_replicated_plan(tmp_path / "plan.json")
    zero1 = tmp_path / "zero1.json"
    zero1.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": False}}))

    def raw(name, **options):
        return tiny_run_config(
            tmp_path / name, steps=6, ep_size=2, eval_every=6, grad_clip=0.0, deepspeed_config=str(zero1), **options
        )

    per_rank = run_distributed(
        train_copies_worker, 4, tmp_path / "spawn", [raw("plain"), raw("replicas", placement_plan=plan)]
    )
    (plain, _), (replicated, _) = per_rank[0]
    torch.testing.assert_close(replicated, plain, rtol=1e-5, atol=1e-5)
    saved = saved_experts(tmp_path / "replicas" / "checkpoints" / "step6")  # one file per logical expert
    for rank in range(4):  # every copy in every EP group equals the saved expert
        for key, tensors in per_rank[rank][1][1].items():
            assert all(torch.equal(tensors[p], v) for p, v in saved[key].items()), (rank, key)


def test_clipping_with_replicas_is_said_once(caplog):
    from types import SimpleNamespace

    from c2r.deepspeed.setup import warn_if_clipping_counts_replicas
    from c2r.moe import MoEConfig, MoELayer

    layers = torch.nn.ModuleList(MoELayer(D, MoEConfig(num_experts=E, top_k=2, ffn_hidden_size=F)) for _ in range(2))
    layers[0].dispatcher = SimpleNamespace(layout=ExpertLayout.contiguous(E, 2))
    layers[1].dispatcher = SimpleNamespace(layout=make_layout("two_ranks"))
    warn_if_clipping_counts_replicas(layers, {"gradient_clipping": 1.0}, "BF16_Optimizer")
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "gradient clipping (1) with replicated experts (MoE layers [1]): DeepSpeed's BF16_Optimizer counts each copy"
    )
    caplog.clear()
    warn_if_clipping_counts_replicas(layers, {"gradient_clipping": 0.0}, "x")  # clipping off: the runs are equal
    warn_if_clipping_counts_replicas(layers[:1], {"gradient_clipping": 1.0}, "x")  # no replicas
    assert not caplog.records


def test_a_balanced_copy_choice_without_replicas_is_said_once(caplog):
    from types import SimpleNamespace

    from c2r.deepspeed.setup import warn_if_copy_choice_is_idle
    from c2r.moe import MoEConfig, MoELayer

    layers = torch.nn.ModuleList(MoELayer(D, MoEConfig(num_experts=E, top_k=2, ffn_hidden_size=F)) for _ in range(2))
    layers[0].dispatcher = layers[1].dispatcher = SimpleNamespace(layout=ExpertLayout.contiguous(E, 2))
    warn_if_copy_choice_is_idle(layers, "balanced")
    (record,) = caplog.records
    assert record.getMessage().startswith("copy_choice 'balanced' has nothing to balance: no MoE layer has replicated")
    caplog.clear()
    warn_if_copy_choice_is_idle(layers, "rule")
    layers[1].dispatcher = SimpleNamespace(layout=make_layout("two_ranks"))
    warn_if_copy_choice_is_idle(layers, "balanced")
    assert not caplog.records
