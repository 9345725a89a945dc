"""c2r.hf: Hugging Face MoE models converted to our layers compute the same function, load with only a rank's experts,
and export back to a checkpoint transformers loads with equal logits.

Tiny randomly initialised models of each architecture (float32, CPU, no downloads; the builders of
tests/test_hf_hooks.py, routers sharpened, DeepSeek-V3 with a non-zero correction bias), saved with save_pretrained
and a tiny BPE tokenizer trained here, then loaded the way a user's model is.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import safetensors  # noqa: E402

import c2r.hf as hf  # noqa: E402
from c2r.experts.config import ExpertConfig  # noqa: E402
from c2r.hf.weights import hf_expert_tensors  # noqa: E402
from c2r.routing import RouterConfig, router_class  # noqa: E402
from c2r.routing.config import AdaMoEConfig, C2RConfig, GroupLimitedConfig  # noqa: E402
from tests.router_helpers import write_lists  # noqa: E402
from tests.test_hf_hooks import DEEPSEEK_ATTN, TINY, VOCAB, E, K, find_moe_sites, make_model  # noqa: E402
from tests.test_hf_hooks import FAMILIES as HOOK_FAMILIES  # noqa: E402


def build_granitemoe(experts_impl="grouped_mm"):
    return transformers.GraniteMoeConfig(num_hidden_layers=2, num_local_experts=E, **TINY), experts_impl


BUILDERS = {name: builder for name, (builder, _) in HOOK_FAMILIES.items()} | {"granitemoe": build_granitemoe}
FAMILIES = sorted(BUILDERS)
assert DEEPSEEK_ATTN  # the DeepSeek builders use it


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: a saved model directory per family, with a tokenizer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> Path:
    """A BPE tokenizer of at most VOCAB tokens trained on a few KB of this repository's README."""
    text = (Path(__file__).parents[1] / "README.md").read_text()[:6000]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"])
    tok.train_from_iterator(text.splitlines(), trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(out)
    assert fast.vocab_size <= VOCAB
    return out


def save_model(family, directory, tokenizer_dir):
    model = make_model(BUILDERS[family])
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory, tokenizer_files):
    """(family, original model, its directory)."""
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, save_model(request.param, directory, tokenizer_files), directory


def input_ids(seed=1, shape=(2, 9)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------------------------------
# Same function: logits and gradients
# ---------------------------------------------------------------------------------------------------------------------


def test_loaded_model_equals_original_in_logits_and_gradients(saved):
    family, original, directory = saved
    model = hf.load(directory)
    blocks = hf.converted_blocks(model)
    hf_blocks = [original.get_submodule(s.block_name) for s in find_moe_sites(original)]
    assert [name for name, _ in blocks] == [s.block_name for s in find_moe_sites(original)]

    ids = input_ids()
    labels = input_ids(seed=2)
    losses = []
    for m in (original, model):
        m.zero_grad()
        out = m(input_ids=ids, labels=labels)
        out.loss.backward()
        losses.append(out)
    torch.testing.assert_close(losses[1].logits, losses[0].logits, atol=1e-5, rtol=0)

    for (_, block), hf_block in zip(blocks, hf_blocks, strict=True):
        hf_router = getattr(hf_block, block.arch.router_attr)
        torch.testing.assert_close(block.router.gate.weight.grad, hf_router.weight.grad, atol=1e-5, rtol=0)
        experts = block.moe.experts
        grads_EFD = [getattr(experts, n).grad.view(E, experts.ffn_hidden_size, -1) for n in ("w1", "v1", "w2")]
        gate_up_grad, down_grad = hf_expert_tensors(*grads_EFD)
        torch.testing.assert_close(gate_up_grad, hf_block.experts.gate_up_proj.grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(down_grad, hf_block.experts.down_proj.grad, atol=1e-5, rtol=0)
        assert block.last_routing is not None and block.last_routing.expert_ids_TK.shape == (ids.numel(), K)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "granitemoe"])
def test_output_router_logits_and_hf_aux_loss_survive_conversion(family):
    original = make_model(BUILDERS[family])
    model = hf.convert(make_model(BUILDERS[family]))
    ids = input_ids()
    with torch.no_grad():
        ref = original(input_ids=ids, output_router_logits=True)
        out = model(input_ids=ids, output_router_logits=True)
    assert len(out.router_logits) == len(ref.router_logits) == len(hf.converted_blocks(model))
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=0)
    assert float(hf.aux_loss(model)) == 0.0  # native routers carry no loss of ours unless asked
    model = hf.convert(make_model(BUILDERS[family]), aux_loss_weight=0.01)
    model(input_ids=ids)
    assert float(hf.aux_loss(model).detach()) > 0


def test_scored_router_reproduces_deepseek_v3_routing():
    """The selection bias chooses, the unbiased sigmoid weighs, groups limit, the route scale multiplies."""
    original = make_model(BUILDERS["deepseek_v3"])
    hf_router = original.get_submodule(find_moe_sites(original)[0].block_name).gate
    model = hf.convert(make_model(BUILDERS["deepseek_v3"]))
    router = hf.converted_blocks(model)[0][1].router
    x_TD = torch.randn(64, TINY["hidden_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, hf_weights_TK, hf_ids_TK = hf_router(x_TD)
        routing = router(x_TD)
    order_hf, order_ours = hf_ids_TK.argsort(dim=1), routing.expert_ids_TK.argsort(dim=1)
    assert torch.equal(hf_ids_TK.gather(1, order_hf), routing.expert_ids_TK.gather(1, order_ours))
    torch.testing.assert_close(routing.weights_TK.gather(1, order_ours), hf_weights_TK.gather(1, order_hf))
    assert bool(hf_router.e_score_correction_bias.abs().max() > 0)
    groups_TG = (routing.expert_ids_TK // (E // 4)).sort(dim=1).values
    assert int((groups_TG[:, 1:] != groups_TG[:, :-1]).sum(dim=1).max()) + 1 <= 2  # topk_group = 2


# ---------------------------------------------------------------------------------------------------------------------
# Loading: only this rank's experts
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "granitemoe"])
def test_each_rank_materialises_only_its_experts(family, tmp_path, tokenizer_files):
    save_model(family, tmp_path, tokenizer_files)
    full = hf.load(tmp_path)
    full_blocks = hf.converted_blocks(full)
    per_layer = sum(getattr(full_blocks[0][1].moe.experts, n).numel() for n in ("w1", "v1", "w2"))
    total = per_layer * len(full_blocks)
    assert full.c2r_hf.load_stats["expert_elements_read"] == total
    for ep_size in (2, 4):
        for rank in range(ep_size):
            model = hf.load(tmp_path, ep_rank=rank, ep_size=ep_size)
            expert_params = sum(p.numel() for _, b in hf.converted_blocks(model) for p in b.moe.experts.parameters())
            assert expert_params == total // ep_size
            assert model.c2r_hf.load_stats["expert_elements_read"] == total // ep_size
            for (_, block), (_, whole) in zip(hf.converted_blocks(model), full_blocks, strict=True):
                assert block.local_experts == list(range(rank * E // ep_size, (rank + 1) * E // ep_size))
                for name in ("w1", "v1", "w2"):
                    assert torch.equal(
                        block.moe.experts.stacked(name), whole.moe.experts.stacked(name)[block.local_experts]
                    )
                assert torch.equal(block.router.gate.weight, whole.router.gate.weight)


def test_expert_memory_grows_with_experts_per_rank(tmp_path):
    """What one rank materialises while loading is its E/R experts, whatever E and R are: twice the experts on the same
    ranks read twice as much, twice the experts on twice the ranks the same (Mixtral, 2 MoE layers)."""

    def mixtral(num_experts):
        return transformers.MixtralConfig(num_hidden_layers=2, num_local_experts=num_experts, **TINY), "grouped_mm"

    per_expert = 3 * TINY["hidden_size"] * TINY["intermediate_size"]  # gate, up, down
    for num_experts in (8, 16):
        directory = tmp_path / f"e{num_experts}"
        make_model(functools.partial(mixtral, num_experts)).save_pretrained(directory)
        for ep_size in (2, 4):
            for rank in range(ep_size):
                model = hf.load(directory, ep_rank=rank, ep_size=ep_size)
                resident = sum(p.numel() for _, b in hf.converted_blocks(model) for p in b.moe.experts.parameters())
                expected = 2 * per_expert * num_experts // ep_size  # 2 layers of E/R experts
                assert model.c2r_hf.load_stats["expert_elements_read"] == resident == expected, (num_experts, ep_size)
                assert model.c2r_hf.load_stats["expert_matrices_read"] == 2 * 3 * num_experts // ep_size


def test_placement_given_by_expert_to_rank(tmp_path, tokenizer_files):
    save_model("qwen3_moe", tmp_path, tokenizer_files)
    expert_to_rank = [1, 0, 1, 0, 0, 1, 1, 0]
    full = hf.converted_blocks(hf.load(tmp_path))[1][1]
    model = hf.load(tmp_path, ep_rank=1, ep_size=2, expert_to_rank=expert_to_rank)
    block = hf.converted_blocks(model)[1][1]
    assert block.local_experts == [0, 2, 5, 6]
    assert torch.equal(block.moe.experts.stacked("w2"), full.moe.experts.stacked("w2")[[0, 2, 5, 6]])
    with pytest.raises(RuntimeError, match="holds 4 of 8 experts.*attach_expert_parallel"):
        model(input_ids=input_ids())
    with pytest.raises(ValueError, match="every rank must hold exactly 4 experts"):
        hf.load(tmp_path, ep_rank=0, ep_size=2, expert_to_rank=[0] * 8)


def test_config_alone_gives_a_random_model_independent_of_placement(tmp_path):
    config, _ = BUILDERS["deepseek_v3"]()
    config.save_pretrained(tmp_path)
    full = hf.load(tmp_path, seed=3)
    assert full.c2r_hf.load_stats == {}
    assert torch.isfinite(logits_of(full, input_ids())).all()
    ranks = [hf.load(tmp_path, seed=3, ep_rank=r, ep_size=2, expert_to_rank=[0, 1] * 4) for r in range(2)]
    for rank in ranks:
        for (_, block), (_, whole) in zip(hf.converted_blocks(rank), hf.converted_blocks(full), strict=True):
            assert torch.equal(block.moe.experts.stacked("w1"), whole.moe.experts.stacked("w1")[block.local_experts])
        for (name, p), (_, q) in zip(rank.named_parameters(), full.named_parameters(), strict=True):
            if ".moe.experts." not in name:
                assert torch.equal(p, q), name


def _expert_parallel_logits(rank, world_size, directory, expert_to_rank, mode):
    model = hf.load(directory, ep_rank=rank, ep_size=world_size, expert_to_rank=expert_to_rank)
    hf.attach_expert_parallel(model, mode=mode)
    return logits_of(model, input_ids(seed=10 + rank))


@pytest.mark.parametrize("mode", ["per-expert", "per-rank"])
def test_expert_parallel_ranks_compute_the_single_rank_function(mode, tmp_path, tokenizer_files):
    """Two gloo ranks, each holding half the experts of a non-contiguous placement, each with its own tokens."""
    from tests.distributed import run_distributed

    original = save_model("deepseek_v3", tmp_path / "src", tokenizer_files)
    expert_to_rank = [1, 0, 0, 1, 1, 0, 1, 0]
    results = run_distributed(_expert_parallel_logits, 2, tmp_path / "ranks", tmp_path / "src", expert_to_rank, mode)
    for rank, logits in enumerate(results):
        torch.testing.assert_close(logits, logits_of(original, input_ids(seed=10 + rank)), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------


def test_export_from_expert_parallel_ranks_reloads_in_transformers(saved, tmp_path):
    family, original, directory = saved
    expert_to_rank = [1, 0, 0, 1, 1, 0, 1, 0]  # not contiguous: the export must still be in logical order
    ranks = [hf.load(directory, ep_rank=r, ep_size=2, expert_to_rank=expert_to_rank) for r in range(2)]
    out = hf.export(ranks, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is type(original)
    ids = input_ids(seed=5)
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(original, ids), atol=1e-5, rtol=0)
    text = "experts on ranks"
    assert (
        transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]
        == (transformers.AutoTokenizer.from_pretrained(directory)(text)["input_ids"])
    )
    with pytest.raises(ValueError, match=r"experts \[1, 2, 5, 7\] are on no model given"):
        hf.export(ranks[1], tmp_path / "partial")


def test_export_after_training_keeps_the_trained_weights(tmp_path, tokenizer_files):
    save_model("olmoe", tmp_path / "src", tokenizer_files)
    model = hf.load(tmp_path / "src").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(hf.export(model, tmp_path / "out"))
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(model, ids), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Switching the router
# ---------------------------------------------------------------------------------------------------------------------


def switched_routers(tmp_path):
    coactivation = np.random.default_rng(0).integers(0, 50, (2, E, E))
    lists = write_lists(str(tmp_path / "lists.npz"), coactivation + coactivation.transpose(0, 2, 1))
    return {
        "topk": (RouterConfig(kind="topk", renormalize=False), None),
        "c2r": (RouterConfig(kind="c2r", c2r=C2RConfig(collaborators=lists, top_t=3)), None),
        "group_limited": (RouterConfig(kind="group_limited", group_limited=GroupLimitedConfig(2, 4)), None),
        "adamoe": (RouterConfig(kind="adamoe", adamoe=AdaMoEConfig(num_null_experts=E)), 2 * K),
        "remoe": (RouterConfig(kind="remoe"), None),
        "adak": (RouterConfig(kind="adak"), None),
    }


@pytest.mark.parametrize("kind", ["topk", "c2r", "group_limited", "adamoe", "remoe", "adak"])
def test_switched_router_runs_and_refuses_export(kind, tmp_path, tokenizer_files):
    save_model("mixtral", tmp_path / "src", tokenizer_files)
    router, top_k = switched_routers(tmp_path)[kind]
    model = hf.load(tmp_path / "src", router=router, top_k=top_k).train()
    ids = input_ids()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (*ids.shape, VOCAB)
    (out.loss + hf.aux_loss(model)).backward()
    for _, block in hf.converted_blocks(model):
        assert block.router.gate.weight.grad is not None
        assert isinstance(block.router, router_class(kind))
        assert block.last_routing.num_tokens == ids.numel()
    with pytest.raises(ValueError, match=rf"uses the '{kind}' router.*mixtral can only express its own routing"):
        hf.export(model, tmp_path / "out")


def test_adamoe_from_pretrained_keeps_the_function_with_twin_nulls(tmp_path, tokenizer_files):
    """AdaMoE's conversion copies the gate into m = E null rows; with k doubled each true expert ties with its null
    twin, so the renormalised weights over the true experts are the old top-k's: the same model."""
    original = save_model("mixtral", tmp_path, tokenizer_files)
    router = RouterConfig(kind="adamoe", adamoe=AdaMoEConfig(num_null_experts=E))
    model = hf.load(tmp_path, router=router, top_k=2 * K)
    ids = input_ids()
    torch.testing.assert_close(logits_of(model, ids), logits_of(original, ids), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------------------------------


def test_unsupported_and_non_moe_models_are_one_clear_line(tmp_path):
    dense = transformers.MistralForCausalLM(transformers.MistralConfig(num_hidden_layers=1, **TINY))
    with pytest.raises(ValueError, match=r"^MistralForCausalLM \(model_type 'mistral'\) is not a supported") as info:
        hf.convert(dense)
    assert "\n" not in str(info.value)
    phimoe = transformers.PhimoeConfig(num_hidden_layers=1, num_local_experts=4, **TINY)
    phimoe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'phimoe'\) is not a supported Hugging Face MoE architecture"):
        hf.load(tmp_path)
    all_dense = transformers.Qwen2MoeConfig(num_hidden_layers=2, num_experts=E, mlp_only_layers=[0, 1], **TINY)
    with pytest.raises(ValueError, match=r"model_type 'qwen2_moe'\) has no Qwen2MoeSparseMoeBlock MoE blocks"):
        hf.convert(transformers.AutoModelForCausalLM.from_config(all_dense))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        hf.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"export needs models converted by c2r.hf"):
        hf.export(dense, tmp_path / "out")


def test_pickled_weights_are_refused_in_one_line_not_loaded_as_a_random_model(tmp_path, tokenizer_files):
    """A directory of pytorch_model.bin looked like a config alone: c2r.hf.load built a random model without a word
    (and c2r-train --hf-model would have fine-tuned it)."""
    original = save_model("qwen3_moe", tmp_path, tokenizer_files)
    for shard in tmp_path.glob("*.safetensors"):
        shard.unlink()
    torch.save(original.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"holds weights as pytorch_model.bin, not safetensors") as info:
        hf.load(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_a_bf16_load_keeps_the_router_in_float32_where_transformers_does(family, tmp_path, tokenizer_files):
    """DeepSeek-V2/V3 keep gate.weight in float32 (_keep_in_fp32_modules_strict); a bf16 gate rounds the router's
    weights and moves some tokens to other experts. Ours stays float32 and routes as transformers' bf16 model."""
    save_model(family, tmp_path, tokenizer_files)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = hf.load(tmp_path, dtype=torch.bfloat16)
    for (name, block), site in zip(hf.converted_blocks(ours), find_moe_sites(theirs), strict=True):
        hf_router = getattr(theirs.get_submodule(site.block_name), block.arch.router_attr)
        assert hf_router.weight.dtype == torch.float32 and block.router.gate.weight.dtype == torch.float32, name
        torch.testing.assert_close(block.router.gate.weight, hf_router.weight, atol=0, rtol=0)
        assert block.moe.experts.w1.dtype == torch.bfloat16
    out_dir = hf.export(ours, tmp_path / "out")
    with safetensors.safe_open(str(next(out_dir.glob("*.safetensors"))), framework="pt") as f:
        gates = [k for k in f.keys() if k.endswith(".gate.weight")]  # noqa: SIM118 (safe_open has no __iter__)
        assert gates and all(f.get_tensor(k).dtype == torch.float32 for k in gates)


def test_export_keeps_the_generation_config(tmp_path, tokenizer_files):
    """Stop tokens and sampling defaults travel with the model (an exported chat model must still stop)."""
    original = save_model("qwen3_moe", tmp_path / "src", tokenizer_files)
    original.generation_config = transformers.GenerationConfig(eos_token_id=[1, 3], temperature=0.7, do_sample=True)
    original.generation_config.save_pretrained(tmp_path / "src")
    for model in (hf.load(tmp_path / "src"), hf.convert(original)):
        out_dir = hf.export(model, tmp_path / "out", tokenizer_dir=tokenizer_files)
        got = transformers.GenerationConfig.from_pretrained(out_dir)
        assert (got.eos_token_id, got.temperature, got.do_sample) == ([1, 3], 0.7, True)


def test_a_batch_balanced_router_refuses_export_and_other_expert_activations_are_one_line(tmp_path, tokenizer_files):
    """The balance bias changes which experts a token takes (at eval too): Mixtral cannot hold it. Experts of an HF
    model are SiLU-gated GLUs: another activation is one clear line, not an AttributeError."""
    save_model("mixtral", tmp_path / "src", tokenizer_files)
    model = hf.load(tmp_path / "src", router=RouterConfig(kind="topk", balance="batch"))
    with pytest.raises(ValueError, match=r"batch-balanced selection.*mixtral can only express its own routing"):
        hf.export(model, tmp_path / "out")
    with pytest.raises(ValueError, match=r"ExpertConfig\(activation='gelu'\) cannot hold its experts") as info:
        hf.load(tmp_path / "src", experts=ExpertConfig(activation="gelu"))
    assert "\n" not in str(info.value)


def test_mixtral_router_jitter_noise_is_applied_in_training_as_transformers_does():
    """Mixtral's router_jitter_noise scales the block's input by U(1 - eps, 1 + eps) in training (not in eval): the
    converted block draws the same noise under the same seed, so a training forward equals transformers'."""
    config, impl = BUILDERS["mixtral"]()
    config.router_jitter_noise = 0.1
    config._experts_implementation = impl
    torch.manual_seed(0)
    original = transformers.AutoModelForCausalLM.from_config(config)
    model = hf.convert(copy.deepcopy(original))
    original.train(), model.train()
    ids = input_ids()
    outs = []
    for m in (original, model):
        torch.manual_seed(5)
        outs.append(m(input_ids=ids).logits)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)
    assert not torch.allclose(model.eval()(input_ids=ids).logits, outs[1], atol=1e-3)  # the noise did act
