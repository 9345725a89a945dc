"""Every router trains the tiny model under DeepSpeed with expert parallelism (2 CPU ranks over gloo), and an
expert-parallel run equals the data-parallel run of the same global batch: routing is the same math on every rank.
Stateful routers keep their state (ReMoE's lambda, the group-limited bias) identical across ranks and across a
checkpoint resume."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from c2r.config_utils import config_from_dict
from c2r.experts import ExpertConfig
from c2r.moe import MoEConfig, MoELayer
from c2r.routing import RouterConfig
from c2r.routing.config import AdaMoEConfig
from c2r.train import RunConfig, train
from tests.distributed import run_distributed
from tests.router_helpers import write_lists
from tests.run_configs import tiny_run_config
from tests.test_deepspeed_training import killed_worker

ROUTERS = {
    "topk": {"balance": "batch"},  # the plain top-k router is in every other test; here its batch balancing
    "c2r": {"c2r": {"top_t": 2}},
    "group_limited": {"group_limited": {"max_groups": 1, "num_groups": 2, "bias_update_rate": 0.001}},
    "adamoe": {"aux_loss_weight": 0.02, "adamoe": {"num_null_experts": 4}},
    "remoe": {"remoe": {"lambda_init": 1e-4}},
}


def router_run(out_dir, kind: str, lists: str, **train) -> dict:
    raw = tiny_run_config(out_dir, steps=12, **train)
    raw["train"]["eval_every"] = 12
    router = copy.deepcopy(ROUTERS[kind])
    if kind == "c2r":
        router["c2r"]["collaborators"] = lists
    if kind == "adamoe":
        raw["model"]["moe"]["top_k"] = 3
    raw["model"]["moe"]["router"] = {"kind": kind, **router}
    return raw


def router_state(engine) -> list:
    """Extra state (ReMoE's lambda, the group-limited bias) of every router that keeps some."""
    return [
        m.get_extra_state() for m in engine.module.modules() if type(m).get_extra_state is not nn.Module.get_extra_state
    ]


def routers_worker(rank, world, raws):
    out = {}
    for kind, raw in raws.items():
        result = train(config_from_dict(RunConfig, raw))
        out[kind] = {
            "losses": result["step_losses"],
            "history": result["history"],
            "state": router_state(result["engine"]),
        }
    return out


def test_every_router_trains_with_ep2_and_equals_the_ep1_run(tmp_path):
    counts = np.random.default_rng(0).integers(0, 100, (2, 8, 8))
    lists = write_lists(tmp_path / "lists.npz", counts + counts.transpose(0, 2, 1))  # symmetric, 2 layers
    runs = {
        ep: run_distributed(
            routers_worker,
            2,
            tmp_path / f"w{ep}",
            {
                kind: router_run(tmp_path / f"{kind}{ep}", kind, lists, ep_size=ep, dispatch="per-rank")
                for kind in ROUTERS
            },
        )
        for ep in (1, 2)
    }
    for kind in ROUTERS:
        ep1, ep2 = runs[1][0][kind], runs[2][0][kind]
        losses = ep2["losses"]
        assert losses[-1] < losses[0] - 0.3, (kind, losses)
        torch.testing.assert_close(ep2["losses"], ep1["losses"], rtol=2e-4, atol=2e-4, msg=kind)
        for a, b in zip(runs[2][0][kind]["state"], runs[2][1][kind]["state"], strict=True):
            for key in a:
                assert torch.equal(a[key], b[key]), (kind, key)  # identical on every rank
    record = runs[2][0]["adamoe"]["history"][-1]
    assert 0 < record["active_experts_per_token"] < 3  # nulls take some slots
    assert len(record["active_experts_per_token_by_layer"]) == 2
    assert runs[2][0]["remoe"]["history"][-1]["remoe_lambda"] > 0
    assert runs[2][0]["group_limited"]["state"][0]["selection_bias_E"].abs().sum() > 0
    assert runs[2][0]["topk"]["state"][0]["bias_E"].abs().sum() > 0  # the running balance bias moved


def resume_worker(rank, world, raw_full, raw_part, raw_resume):
    full = train(config_from_dict(RunConfig, raw_full))
    assert killed_worker(rank, world, raw_part, 6) == "killed"  # dies right after its step-6 checkpoint
    resumed = train(config_from_dict(RunConfig, raw_resume))
    return {
        "full": full["step_losses"],
        "resumed": resumed["step_losses"],
        "state_full": router_state(full["engine"]),
        "state_resumed": router_state(resumed["engine"]),
    }


@pytest.mark.parametrize("kind", ["remoe", "group_limited", "topk"])
def test_router_state_survives_a_checkpoint_resume(tmp_path, kind):
    full = router_run(tmp_path / "full", kind, "", ep_size=2)
    part = router_run(tmp_path / "part", kind, "", ep_size=2, save_every=6)
    resume = router_run(tmp_path / "part", kind, "", ep_size=2, resume=True)
    (r0, _) = run_distributed(resume_worker, 2, tmp_path / "w", full, part, resume)
    torch.testing.assert_close(r0["resumed"], r0["full"][6:], rtol=1e-5, atol=1e-5)
    for a, b in zip(r0["state_full"], r0["state_resumed"], strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def init_from_worker(rank, world, raw_topk, raw_adamoe):
    topk = train(config_from_dict(RunConfig, raw_topk))
    adamoe = train(config_from_dict(RunConfig, raw_adamoe))
    return {"topk": topk["history"], "adamoe": adamoe["step_losses"]}


def test_adamoe_converts_a_trained_topk_model(tmp_path):
    raw_topk = tiny_run_config(tmp_path / "topk", steps=30, ep_size=2)
    raw_adamoe = tiny_run_config(tmp_path / "ada", steps=3, ep_size=2, init_from=str(tmp_path / "topk"), warmup_steps=1)
    raw_adamoe["model"]["moe"].update(top_k=4, router={"kind": "adamoe", "adamoe": {"num_null_experts": 8}})
    (r0, _) = run_distributed(init_from_worker, 2, tmp_path / "w", raw_topk, raw_adamoe)
    # From the top-2 model's weights (not a fresh model at ~5.5 nats), with null twins of each expert.
    assert r0["adamoe"][0] < r0["topk"][-1]["train_loss"] + 0.1


def test_adamoe_conversion_keeps_the_topk_function_when_nulls_twin_every_expert():
    torch.manual_seed(0)
    E, D = 8, 16
    base = MoELayer(D, MoEConfig(num_experts=E, top_k=2, ffn_hidden_size=8, experts=ExpertConfig(backend="torch")))
    ada = MoELayer(
        D,
        MoEConfig(
            num_experts=E,
            top_k=4,
            ffn_hidden_size=8,
            router=RouterConfig(kind="adamoe", adamoe=AdaMoEConfig(num_null_experts=E)),
            experts=ExpertConfig(backend="torch"),
        ),
    )
    ada.load_state_dict(base.state_dict(), strict=False)
    ada.router.init_from_pretrained({"kind": "topk"})
    x = torch.randn(50, D)
    y_base, r_base = base(x)
    y_ada, r_ada = ada(x)
    torch.testing.assert_close(y_ada, y_base)
    assert r_ada.valid_TK.sum(dim=1).eq(2).all()
