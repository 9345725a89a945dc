"""c2r-adak: P-Warm labels and p bisection, PPO loss sign and clipping, the expected-k penalty (hand-computed), and
end to end under DeepSpeed on CPU: a tiny top-k model trained by c2r.train, then its allocators on 1 and 2 ranks."""

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from c2r.adak_objective import (
    calibrate_pwarm_p,
    expected_k,
    layer_advantages,
    ppo_clip_loss,
    ppo_objective,
    pwarm_labels,
    pwarm_loss,
    token_log_likelihood,
)
from c2r.adak_train import ADAK_CLI, AdaKTrainConfig, read_source_config
from c2r.config_utils import config_from_dict
from c2r.routing import RouterConfig
from c2r.routing.adak import AdaKRouter
from c2r.routing.config import AdaKConfig
from c2r.run_setup import RECORDED_KEYS, RunConfig
from c2r.train import train
from tests.distributed import run_distributed
from tests.run_configs import tiny_run_config

# Rows are tokens; columns deliberately unsorted. Sorted running sums:
#   (0.5, 0.8, 1.0, 1.0)   (0.4, 0.8, 0.9, 1.0)   (0.9, 0.95, 0.98, 1.0)   (0.25, 0.5, 0.75, 1.0)
PROBS_TE = torch.tensor(
    [
        [0.2, 0.5, 0.0, 0.3],
        [0.1, 0.4, 0.1, 0.4],
        [0.03, 0.02, 0.9, 0.05],
        [0.25, 0.25, 0.25, 0.25],
    ],
    dtype=torch.float64,
)


def test_pwarm_labels_hand_case():
    # The smallest k whose top-k mass reaches p ("at least": p = 0.5 is reached by 0.5 itself).
    assert pwarm_labels(PROBS_TE, 0.3, 4).tolist() == [1, 1, 1, 2]
    assert pwarm_labels(PROBS_TE, 0.5, 4).tolist() == [1, 2, 1, 2]
    assert pwarm_labels(PROBS_TE, 0.6, 4).tolist() == [2, 2, 1, 3]
    assert pwarm_labels(PROBS_TE, 0.85, 4).tolist() == [3, 3, 1, 4]
    assert pwarm_labels(PROBS_TE, 0.85, 3).tolist() == [3, 3, 1, 3]  # clipped to the allocator's N


def test_p_bisection_hits_the_target_mean_label():
    # Mean label: 1.5 for p in (0.4, 0.5], 2.0 for p in (0.5, 0.75], 2.25 for p in (0.75, 0.8].
    p, mean = calibrate_pwarm_p([PROBS_TE], target_k=2.0, max_k=4)
    assert mean == 2.0 and 0.5 < p <= 0.75
    assert pwarm_labels(PROBS_TE, p, 4).float().mean().item() == 2.0
    p, mean = calibrate_pwarm_p([PROBS_TE[:2], PROBS_TE[2:]], target_k=1.9, max_k=4)  # nearest reachable: 2.0
    assert mean == 2.0 and 0.5 < p <= 0.75
    p, mean = calibrate_pwarm_p([PROBS_TE], target_k=1.0, max_k=4)
    assert mean == 1.0 and p < 0.25


def test_pwarm_loss_of_a_uniform_allocator_is_log_n():
    router = AdaKRouter(3, 4, 2, RouterConfig(kind="adak", adak=AdaKConfig(mode="default")))
    router(torch.randn(5, 3))
    loss = pwarm_loss([router.last_allocation], [torch.tensor([1, 2, 3, 4, 2])])
    torch.testing.assert_close(loss, torch.tensor(math.log(4.0)))


def test_layer_advantages():
    # A_l = gamma^(L - l) (reward - baseline); diff = (0.5, -1); L = 3, gamma = 0.5.
    adv = layer_advantages(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), num_layers=3, gamma=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.125, -0.25], [0.25, -0.5], [0.5, -1.0]]))


def ppo_grad(ratio: float, advantage: float, eps: float = 0.2) -> tuple[float, float]:
    new = torch.tensor([math.log(ratio)], requires_grad=True)
    loss = ppo_clip_loss(new, torch.zeros(1), torch.tensor([advantage]), eps)
    loss.backward()
    return loss.item(), new.grad.item()


def test_ppo_clipping_zeroes_the_gradient_on_the_clipped_side_only():
    # ratio 1.5 > 1 + eps with A > 0: min(1.5, 1.2) = 1.2 is a constant -> no gradient (no further push).
    assert ppo_grad(1.5, 1.0) == pytest.approx((-1.2, 0.0))
    # ratio 0.5 < 1 - eps with A < 0: min(-0.5, -0.8) = -0.8 -> no gradient.
    assert ppo_grad(0.5, -1.0) == pytest.approx((0.8, 0.0))
    # The other sides stay unclipped: d(-r A)/d log r = -r A.
    assert ppo_grad(1.5, -1.0) == pytest.approx((1.5, 1.5))
    assert ppo_grad(0.5, 1.0) == pytest.approx((-0.5, -0.5))
    assert ppo_grad(1.1, 2.0) == pytest.approx((-2.2, -2.2))  # inside the band: plain policy gradient


@pytest.mark.parametrize("advantage, moves", [(1.0, "up"), (-1.0, "down")])
def test_ppo_step_moves_the_chosen_k_with_the_advantage_sign(advantage, moves):
    # One token took k = 3; one AdamW step on the PPO objective (ratio 1, inside the band) moves P(k = 3) up for a
    # positive advantage and down for a negative one.
    torch.manual_seed(0)
    router = AdaKRouter(4, 4, 2, RouterConfig(kind="adak"))
    x = torch.randn(1, 4)
    router.force_k(torch.tensor([3]))
    router(x)
    before = router.last_allocation.probs_TJ[0, 2].item()
    old = [router.last_allocation.log_prob_T.detach()]
    loss, _ = ppo_objective([router.last_allocation], old, torch.tensor([[advantage]]), 0.2, k_penalty=0.0)
    loss.backward()
    torch.optim.AdamW(router.allocator.parameters(), lr=1e-2, weight_decay=0.1).step()
    router(x)
    after = router.last_allocation.probs_TJ[0, 2].item()
    assert before == pytest.approx(0.25)
    assert (after > before) if moves == "up" else (after < before)


def test_expected_k_penalty_value():
    # Rows (0.5, 0.25, 0.25) -> 1*0.5 + 2*0.25 + 3*0.25 = 1.75 and (0, 0, 1) -> 3: mean 2.375.
    log_probs = torch.tensor([[0.5, 0.25, 0.25], [1e-30, 1e-30, 1.0]]).log()
    torch.testing.assert_close(expected_k(log_probs), torch.tensor(2.375))

    class Alloc:  # zero advantage: the objective is lambda times the layers' mean expected k
        def __init__(self, log_probs_TN):
            self.log_probs_TJ, self.log_prob_T = log_probs_TN, log_probs_TN[:, 0]

    uniform = torch.full((2, 3), 1 / 3).log()  # expected k 2
    loss, stats = ppo_objective(
        [Alloc(log_probs), Alloc(uniform)], [log_probs[:, 0], uniform[:, 0]], torch.zeros(2, 2), 0.2, k_penalty=3e-3
    )
    torch.testing.assert_close(loss, torch.tensor(3e-3 * (2.375 + 2.0) / 2))
    torch.testing.assert_close(stats["expected_k"], torch.tensor((2.375 + 2.0) / 2))


def test_token_log_likelihood_is_in_router_token_order():
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    ll = token_log_likelihood(logits, targets)
    assert ll.shape == (6,)
    torch.testing.assert_close(ll[4], logits[1, 1].log_softmax(0)[targets[1, 1]])


def test_options_are_validated_and_help_works(capsys):
    with pytest.raises(ValueError, match=r"clip_eps \(1.5\) must be between 0 and 1"):
        AdaKTrainConfig(checkpoint="x", clip_eps=1.5)
    with pytest.raises(ValueError, match=r"steps \(-1\) and warm_steps \(0\) must be >= 0"):
        AdaKTrainConfig(checkpoint="x", steps=-1, warm_steps=0)
    with pytest.raises(SystemExit) as exit_info:
        ADAK_CLI.parse(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    assert "--warm-steps" in help_text and "(adak.ppo_epochs, default 2)" in help_text
    repo = Path(__file__).resolve().parent.parent
    cited = re.findall(r"[\w./-]+\.md\b", help_text)
    assert cited and all((repo / path).exists() for path in cited), cited  # only files the repository has


def saved_run(tag: Path, router: dict, **train) -> str:
    """A checkpoint tag dir holding only a c2r_config.json, as c2r-train saves it."""
    tag.mkdir(parents=True)
    saved = tiny_run_config(tag.parent, **train)
    saved["model"]["moe"]["router"] = router
    (tag / "c2r_config.json").write_text(json.dumps(saved))
    return str(tag)


def test_run_config_switches_to_adak_and_refuses_other_routers(tmp_path):
    source = saved_run(tmp_path / "src" / "step1", {"kind": "topk"}, lr=3e-3, weight_decay=0.2, grad_clip=1.0)
    flags = ["--checkpoint", source, "--ep-size", "2", "--steps", "5", "--warm-steps", "3", "--batch-size", "2"]
    config = ADAK_CLI.resolve(flags + ["--set", "data.max_bytes=1000", "--set", "model.moe.router.adak.max_k=4"])
    router = config.model.moe.router
    assert (router.kind, router.adak.mode, router.adak.max_k) == ("adak", "argmax", 4)
    tc = config.train
    assert (tc.init_from, tc.ep_size, tc.steps, tc.batch_size) == (source, 2, 8, 2)
    assert (tc.lr, tc.weight_decay, tc.grad_clip, tc.resume) == (1e-3, 0.1, 0.0, False)
    assert config.data.max_bytes == 1000
    assert (config.adak.steps, config.adak.warm_steps, config.adak.ppo_epochs) == (5, 3, 2)
    # Ada-K's options are a config section like the others: --set, shorthand flags, validation naming the value.
    config = ADAK_CLI.resolve(["--checkpoint", source, "--set", "adak.ppo_epochs=3", "--lambda", "0.01"])
    assert (config.adak.ppo_epochs, config.adak.k_penalty, config.train.batch_size) == (3, 0.01, 4)
    config = ADAK_CLI.resolve(["--checkpoint", source, "--warm-steps", "0", "--max-k", "0"])  # 0 is a value
    assert (config.adak.warm_steps, config.train.steps) == (0, 200)
    with pytest.raises(ValueError, match=r"clip_eps \(1.5\) must be between 0 and 1"):
        ADAK_CLI.resolve(["--checkpoint", source, "--set", "adak.clip_eps=1.5"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['ppo_epoch'\] in config section 'adak'"):
        ADAK_CLI.resolve(["--checkpoint", source, "--set", "adak.ppo_epoch=3"])
    with pytest.raises(ValueError, match="needs the model to train allocators on: --checkpoint"):
        ADAK_CLI.resolve(["--steps", "3"])
    with pytest.raises(ValueError, match="has router kind 'remoe'"):
        ADAK_CLI.resolve(["--checkpoint", saved_run(tmp_path / "other" / "step1", {"kind": "remoe"})])


# ---------------------------------------------------------------------------------------------------------------
# End to end under DeepSpeed (gloo): c2r.train makes a tiny top-k model, c2r-adak trains its allocators.


def topk_worker(rank, world, raw):
    train(config_from_dict(RunConfig, raw))


def saved_tensors(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DeepSpeed checkpoint's module: the non-expert state dict and the per-expert files."""
    tensors = dict(torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"])
    for path in sorted(tag_dir.glob("layer_*_expert_*_model_states.pt")):
        tensors.update({f"{path.name}:{k}": v for k, v in torch.load(path, weights_only=False).items()})
    return tensors


@pytest.fixture(scope="module")
def topk_checkpoint(tmp_path_factory) -> Path:
    """A batch-balanced top-k run, as c2r-train's default (``balance: auto``) trains it."""
    root = tmp_path_factory.mktemp("topk")
    raw = tiny_run_config(root / "run", steps=3)
    raw["model"]["moe"]["router"] = {"balance": "auto"}
    run_distributed(topk_worker, 1, root / "w", raw)
    return root / "run"


def adak_worker(rank, world, argv, check_reload):
    from c2r.adak_train import train_adak

    config = ADAK_CLI.resolve(argv + ["--set", "train.batch_size=2"])
    result = train_adak(config)
    out = {
        "allocators": [r.allocator.weight.detach().clone() for r in result["routers"]],
        "history": result["history"],
    }
    if check_reload:
        out["reload_error"] = reload_difference(result["engine"], config.train.out_dir)
    return out


def reload_difference(engine, out_dir: str) -> float:
    """Load the Ada-K checkpoint the way `c2r-train --init-from` does; return the largest difference of its
    argmax-mode logits from the trained engine's."""
    from c2r.deepspeed.checkpoint import init_from_checkpoint
    from c2r.routing.adak import adak_routers
    from c2r.run_setup import build_engine, run_config_record

    _, saved = read_source_config(out_dir)
    config = config_from_dict(RunConfig, {key: saved[key] for key in ("model", "train", "data", "profile")})
    fresh = build_engine(config, torch.device("cpu"))
    init_from_checkpoint(fresh, out_dir, run_config_record(config, fresh.module))
    assert [r.mode for r in adak_routers(fresh.module)] == ["argmax", "argmax"]
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((fresh(idx).logits - engine(idx).logits).abs().max())


def check_frozen_and_trained(source: Path, out: Path) -> None:
    """Only the allocators differ between the source checkpoint and the Ada-K one."""
    before = saved_tensors(source)
    after = saved_tensors(out)
    allocator_keys = sorted(k for k in after if "allocator" in k)
    assert len(allocator_keys) == 2 and set(after) - set(allocator_keys) == set(before)
    assert any(key.endswith("balancer._extra_state") for key in before)  # the batch-balance bias is kept too
    for key, value in before.items():
        if isinstance(value, dict):  # a module's extra state: {"bias_E": tensor}
            assert value.keys() == after[key].keys() and all(torch.equal(after[key][k], value[k]) for k in value)
        else:
            assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert all(float(after[k].abs().max()) > 0 for k in allocator_keys)  # trained away from the zero start


def options(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--warm-steps",
        "2",
        "--steps",
        "2",
        "--calib-batches",
        "1",
        "--eval-batches",
        "1",
        "--log-every",
        "1",
        *extra,
    ]


def test_adak_trains_only_the_allocators_and_its_checkpoint_loads(topk_checkpoint, tmp_path, capsys):
    (result,) = run_distributed(adak_worker, 1, tmp_path / "w", options(topk_checkpoint, tmp_path / "adak"), True)
    assert result["reload_error"] < 1e-5
    assert [r["phase"] for r in result["history"]] == ["pwarm", "pwarm", "ppo", "ppo"]
    assert {"reward", "baseline", "advantage", "sampled_k", "expected_k", "clip_fraction"} <= set(result["history"][-1])
    source_dir, _ = read_source_config(str(topk_checkpoint))
    out_dir, saved = read_source_config(str(tmp_path / "adak"))
    assert saved["model"]["moe"]["router"]["kind"] == "adak"
    assert saved["model"]["moe"]["router"]["adak"]["mode"] == "argmax"
    check_frozen_and_trained(source_dir, out_dir)
    summary = json.loads((tmp_path / "adak" / "adak_eval.json").read_text())
    assert summary["topk"]["active_experts_per_token_by_layer"] == [2.0, 2.0]
    assert len(summary["adak_argmax"]["active_experts_per_token_by_layer"]) == 2
    assert len(summary["adak_argmax"]["mean_k_by_difficulty_quartile"]) == 4
    assert summary["pwarm_mean_label"] == pytest.approx(2.0, abs=0.1)
    assert (tmp_path / "adak" / "adak_metrics.jsonl").read_text().count("\n") == 4
    # The saved run config holds every section, adak included, and loads back with --print-config as it was saved.
    assert saved["adak"]["ppo_epochs"] == 2 and saved["adak"]["checkpoint"] == str(topk_checkpoint)
    capsys.readouterr()  # only what --print-config prints below
    assert ADAK_CLI.main(["--config", str(out_dir / "c2r_config.json"), "--print-config"], run=None) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {key: value for key, value in saved.items() if key not in RECORDED_KEYS}
    assert dataclasses.asdict(ADAK_CLI.resolve(["--config", str(out_dir / "c2r_config.json")])) == printed


def test_adak_with_expert_parallelism_on_2_ranks(topk_checkpoint, tmp_path):
    # The ep-1 checkpoint's per-expert files load into ep 2; allocators stay identical on both ranks (replicated,
    # gradients all-reduced over the whole job).
    ranks = run_distributed(
        adak_worker, 2, tmp_path / "w", options(topk_checkpoint, tmp_path / "adak", "--ep-size", "2"), False
    )
    for mine, theirs in zip(ranks[0]["allocators"], ranks[1]["allocators"]):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    source_dir, _ = read_source_config(str(topk_checkpoint))
    out_dir, saved = read_source_config(str(tmp_path / "adak"))
    assert saved["train"]["ep_size"] == 2
    check_frozen_and_trained(source_dir, out_dir)
    assert json.loads((tmp_path / "adak" / "adak_eval.json").read_text())["world_size"] == 2


# ---------------------------------------------------------------------------------------------------------------
# Review findings: each test failed before its fix.


def routing_worker(rank, world, source: str, out: str):
    """The source top-k engine and c2r-adak's engine in default mode, both in evaluation, on the same batch."""
    from c2r.adak_train import set_routers, setup_run
    from c2r.deepspeed.checkpoint import init_from_checkpoint
    from c2r.run_setup import build_engine, run_config_record

    run = setup_run(ADAK_CLI.resolve(["--checkpoint", source, "--out", out]))  # joins DeepSpeed's job first
    _, saved = read_source_config(source)
    config = config_from_dict(RunConfig, {key: saved[key] for key in ("model", "train", "data")})
    topk = build_engine(config, torch.device("cpu"))
    init_from_checkpoint(topk, source, run_config_record(config, topk.module))
    set_routers(run.routers, "default")
    topk.eval()
    run.engine.eval()
    idx = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = topk(idx), run.engine(idx)
    plain = [r.router_probs_TE.topk(2).indices for r in (router.last_allocation for router in run.routers)]
    return {
        "expert_ids": [(x.expert_ids_TK, y.expert_ids_TK) for x, y in zip(a.routing, b.routing)],
        "weights": [(x.weights_TK, y.weights_TK) for x, y in zip(a.routing, b.routing)],
        "plain_ids": plain,
        "logits": (a.logits, b.logits),
    }


def test_default_mode_routes_as_the_batch_balanced_source(topk_checkpoint, tmp_path):
    # The source picks experts by logits + its running balance bias; Ada-K's default mode must be that router (it
    # ranked by probability alone and dropped the bias on load).
    (result,) = run_distributed(routing_worker, 1, tmp_path / "w", str(topk_checkpoint), str(tmp_path / "adak"))
    for (source_ids, adak_ids), plain_ids in zip(result["expert_ids"], result["plain_ids"]):
        assert torch.equal(source_ids, adak_ids)
        assert not torch.equal(source_ids.sort(dim=1).values, plain_ids.sort(dim=1).values)  # the bias matters
    for source_w, adak_w in result["weights"]:
        assert torch.equal(source_w, adak_w)
    assert torch.equal(*result["logits"])


def edited_copy(checkpoint: Path, dest: Path, **changes) -> Path:
    """A copy of ``checkpoint``'s latest tag whose c2r_config.json has ``changes`` ("section.key": value) applied."""
    source_dir, saved = read_source_config(str(checkpoint))
    shutil.copytree(source_dir, dest)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = saved
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    (dest / "c2r_config.json").write_text(json.dumps(saved))
    return dest


def bf16_worker(rank, world, argv):
    from c2r.adak_train import set_routers, train_adak

    result = train_adak(ADAK_CLI.resolve(argv + ["--set", "train.batch_size=2"]))
    engine, routers = result["engine"], result["routers"]
    optimizer_steps = [int(engine.optimizer.state[r.allocator.weight]["step"]) for r in routers]
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    engine.train()  # as in training
    with torch.no_grad():
        set_routers(routers, "default")
        baselines = [engine(idx).logits for _ in range(2)]
        set_routers(routers, "sample")
        rollout = engine(idx).logits
        ks = [r.last_allocation.k_T for r in routers]
        set_routers(routers, "sample", forced_k=ks)
        replay = engine(idx).logits
    return {"optimizer_steps": optimizer_steps, "baselines": baselines, "rollout": rollout, "replay": replay}


@pytest.fixture(scope="module")
def bf16_run(topk_checkpoint, tmp_path_factory) -> dict:
    """c2r-adak under a bf16 DeepSpeed config on a source saved with grad_accum 2 and dropout 0.3 (an fp32 model),
    into an output directory holding an older run (--overwrite)."""
    root = tmp_path_factory.mktemp("bf16")
    source = edited_copy(topk_checkpoint, root / "src" / "step3", **{"train.grad_accum": 2, "model.dropout": 0.3})
    ds_config = root / "bf16.json"
    ds_config.write_text(json.dumps({"bf16": {"enabled": True}}))
    out = root / "adak"
    (out / "checkpoints" / "step6").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step2")
    argv = options(source, out, "--deepspeed-config", str(ds_config), "--overwrite")
    (result,) = run_distributed(bf16_worker, 1, root / "w", argv)
    return {**result, "source": source, "out": out}


def test_grad_accum_of_the_source_does_not_merge_optimizer_steps(bf16_run):
    # 2 P-Warm steps + 2 PPO batches x 2 epochs = 6 AdamW steps (grad_accum 2 made DeepSpeed step every 2nd call: 3).
    assert bf16_run["optimizer_steps"] == [6, 6]


def test_frozen_model_has_no_dropout(bf16_run):
    # The source's dropout 0.3 is off: the baseline repeats and the forced replay is the rollout.
    assert torch.equal(*bf16_run["baselines"])
    assert torch.equal(bf16_run["rollout"], bf16_run["replay"])


def test_bf16_run_saves_the_source_weights_bit_for_bit(bf16_run):
    out_dir, saved = read_source_config(str(bf16_run["out"]))
    check_frozen_and_trained(bf16_run["source"], out_dir)  # float32 as the source, not bf16-rounded
    assert saved["model"]["dropout"] == 0.0 and saved["train"]["grad_accum"] == 1


def test_overwrite_replaces_the_older_run_and_an_existing_out_is_refused(bf16_run, topk_checkpoint, tmp_path):
    from c2r.adak_train import setup_run

    checkpoints = bf16_run["out"] / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step4" and not (checkpoints / "step6").exists()
    config = ADAK_CLI.resolve(["--checkpoint", str(topk_checkpoint), "--out", str(bf16_run["out"])])
    with pytest.raises(ValueError, match="already holds a run") as error:
        setup_run(config)
    assert "replace it with --overwrite" in str(error.value) and "--resume" not in str(error.value)  # c2r-adak has none


def test_unsupported_settings_are_refused_in_one_line(tmp_path):
    source = saved_run(tmp_path / "src" / "step1", {"kind": "topk", "balance": "batch"}, grad_accum=2)
    config = ADAK_CLI.resolve(["--checkpoint", source])  # the source's grad_accum is replaced, its balance kept
    assert (config.train.grad_accum, config.model.moe.router.balance, config.train.warmup_steps) == (1, "auto", 0)
    settings = ["train.resume=true", "train.save_every=10", "train.warmup_steps=5", "profile.enabled=true"]
    flags = [arg for setting in settings for arg in ("--set", setting)]
    with pytest.raises(ValueError) as error:
        ADAK_CLI.resolve(["--checkpoint", source, *flags])
    message = str(error.value)
    assert "\n" not in message and message.startswith("c2r-adak does not support")
    for named in ("train.resume=True", "train.save_every=10", "train.warmup_steps=5", "profile.enabled=True"):
        assert named in message
    for setting in ("train.grad_accum=2", "model.dropout=0.1"):
        with pytest.raises(ValueError, match=f"does not support {setting}"):
            ADAK_CLI.resolve(["--checkpoint", source, "--set", setting])


@pytest.mark.parametrize("target, max_k", [(0.0, 0), (9.0, 0), (5.0, 4), (0.5, 0)])
def test_pwarm_target_k_must_be_between_1_and_max_k(tmp_path, target, max_k):
    source = saved_run(tmp_path / "src" / "step1", {"kind": "topk"})
    flags = ["--checkpoint", source, "--pwarm-target-k", str(target), "--max-k", str(max_k)]
    with pytest.raises(ValueError, match=rf"pwarm_target_k \({target}\) must be between 1 and adak max_k"):
        ADAK_CLI.resolve(flags)
    assert ADAK_CLI.resolve(flags[:2] + ["--pwarm-target-k", "1.5"]).adak.pwarm_target_k == 1.5


def test_hugging_face_runs_are_refused(tmp_path):
    tag = tmp_path / "hf" / "step1"
    saved_run(tag, {"kind": "topk"})
    saved = json.loads((tag / "c2r_config.json").read_text())
    (tag / "c2r_config.json").write_text(json.dumps({**saved, "hf": {"model_dir": "models/qwen"}}))
    with pytest.raises(ValueError, match="is a Hugging Face model's run"):
        ADAK_CLI.resolve(["--checkpoint", str(tag)])
    plain = saved_run(tmp_path / "plain" / "step1", {"kind": "topk"})
    with pytest.raises(ValueError, match="not a Hugging Face model"):
        ADAK_CLI.resolve(["--checkpoint", plain, "--set", "hf.model_dir=models/qwen"])


def test_another_max_k_is_one_line(topk_checkpoint, tmp_path):
    from tests.bad_inputs import child_env, error_lines

    adak8 = edited_copy(topk_checkpoint, tmp_path / "adak8" / "step3", **{"model.moe.router.kind": "adak"})
    adak4 = edited_copy(
        topk_checkpoint,
        tmp_path / "adak4" / "step3",
        **{"model.moe.router.kind": "adak", "model.moe.router.adak.max_k": 4},
    )
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(tiny_run_config(tmp_path / "unused")))
    commands = [
        ["c2r.adak_train", "--checkpoint", str(adak8), "--max-k", "4", "--out", str(tmp_path / "o1")],
        [
            "c2r.train",
            "--config",
            str(tiny),
            "--init-from",
            str(adak4),
            "--router",
            "adak",
            "--out",
            str(tmp_path / "o2"),
        ],
    ]
    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(
                lambda argv: subprocess.run(
                    [sys.executable, "-m", *argv], env=child_env(), capture_output=True, text=True, timeout=300
                ),
                commands,
            )
        )
    for result, (saved_k, k) in zip(results, [(8, 4), (4, 8)]):
        lines = error_lines(result)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(lines) == 1 and f"adak max_k={saved_k} in the checkpoint, {k} here" in lines[0], lines
