"""Hugging Face / AutoEP routing hooks: the trace holds exactly the experts each model's own router chose.

Tiny randomly initialised models (no downloads). The expected routing is recomputed here, independently of the
hooks, from the router logits the model itself returns (``output_router_logits=True``) with each family's top-k
rule; for AutoEP layers, from ``router.gate`` applied to the layer's input.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from profiling.hf_hooks import (  # noqa: E402
    attach_hf_routing_hooks,
    find_moe_sites,
    hf_moe_shape,
    normalize_expert_ids,
    trace_hf_model,
)
from profiling.trace import RoutingTraceRecorder, TraceConfig  # noqa: E402

VOCAB, E, K = 100, 8, 2
TINY = dict(
    hidden_size=32,
    intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    num_experts_per_tok=K,
    max_position_embeddings=64,
)
DEEPSEEK_ATTN = dict(
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    head_dim=4,
    num_key_value_heads=4,
)


# ---------------------------------------------------------------------------------------------------------------------
# Each family's routing rule, written out here so the test does not share code with what it checks
# ---------------------------------------------------------------------------------------------------------------------


def softmax_topk(logits_TE, config):
    """Mixtral (always renormalised), Qwen2/3-MoE and OLMoE (renormalised when norm_topk_prob)."""
    probs_TE = logits_TE.float().softmax(dim=-1)
    weights_TK, ids_TK = probs_TE.topk(config.num_experts_per_tok, dim=-1)
    if getattr(config, "norm_topk_prob", True):
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return ids_TK, weights_TK


def _group_allowed_TE(group_scores_TG, topk_group, experts_per_group):
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_scores_TG.topk(topk_group, dim=-1).indices, True)
    return keep_TG.repeat_interleave(experts_per_group, dim=1)


def deepseek_v2_rule(logits_TE, config):
    """Softmax, then greedy or group-limited greedy (groups ranked by their best expert), scaled."""
    scores_TE = logits_TE.float().softmax(dim=-1)
    if config.topk_method == "group_limited_greedy":
        T, per_group = scores_TE.shape[0], scores_TE.shape[1] // config.n_group
        best_TG = scores_TE.view(T, config.n_group, per_group).amax(dim=-1)
        scores_TE = scores_TE.where(_group_allowed_TE(best_TG, config.topk_group, per_group), 0.0)
    weights_TK, ids_TK = scores_TE.topk(config.num_experts_per_tok, dim=-1)
    return ids_TK, weights_TK * config.routed_scaling_factor


def deepseek_v3_rule(logits_TE, config, bias_E):
    """Sigmoid; choose with the correction bias among the groups with the best top-2 sums; weigh without it."""
    scores_TE = logits_TE.float().sigmoid()
    choice_TE = scores_TE + bias_E
    T, per_group = scores_TE.shape[0], scores_TE.shape[1] // config.n_group
    top2_TG = choice_TE.view(T, config.n_group, per_group).topk(2, dim=-1).values.sum(dim=-1)
    choice_TE = choice_TE.where(_group_allowed_TE(top2_TG, config.topk_group, per_group), float("-inf"))
    ids_TK = choice_TE.topk(config.num_experts_per_tok, dim=-1).indices
    weights_TK = scores_TE.gather(1, ids_TK)
    if config.norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return ids_TK, weights_TK * config.routed_scaling_factor


def autoep_rule(router, x_TH):
    """DeepSpeed TokenChoiceTopKRouter, softmax scoring (the Mixtral / Qwen3 presets)."""
    assert router.score_func == "softmax" and router.num_expert_groups is None
    scores_TE = router.gate(x_TH).float().softmax(dim=-1)
    weights_TK, ids_TK = scores_TE.topk(router.top_k, dim=-1)
    if router.route_norm:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return ids_TK, weights_TK * router.route_scale


# ---------------------------------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------------------------------


def _sharpen_routers(model):
    """Router weights at std 1 (HF initialises them near zero): decisive routing, no near-ties between experts."""
    for site in find_moe_sites(model):
        block = model.get_submodule(site.block_name)
        gate = getattr(block, "gate", None) or getattr(block, "router", None)
        weight = gate.gate.weight if hasattr(gate, "gate") else gate.weight
        with torch.no_grad():
            weight.normal_(0.0, 1.0)
    return model


def build_mixtral(experts_impl="grouped_mm"):
    config = transformers.MixtralConfig(num_hidden_layers=2, num_local_experts=E, **TINY)
    return config, experts_impl


def build_qwen2_moe(experts_impl="grouped_mm"):
    # layer 1 dense: the MoE layer indices are 0 and 1 for transformer layers 0 and 2
    config = transformers.Qwen2MoeConfig(
        num_hidden_layers=3,
        num_experts=E,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        mlp_only_layers=[1],
        norm_topk_prob=False,
        **TINY,
    )
    return config, experts_impl


def build_qwen3_moe(experts_impl="grouped_mm"):
    config = transformers.Qwen3MoeConfig(
        num_hidden_layers=2, num_experts=E, moe_intermediate_size=16, head_dim=8, norm_topk_prob=True, **TINY
    )
    return config, experts_impl


def build_olmoe(experts_impl="grouped_mm"):
    config = transformers.OlmoeConfig(num_hidden_layers=2, num_experts=E, norm_topk_prob=False, **TINY)
    return config, experts_impl


def build_deepseek_v2(experts_impl="grouped_mm"):
    config = transformers.DeepseekV2Config(
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=E,
        n_shared_experts=1,
        moe_intermediate_size=16,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=1,  # with topk_group >= top_k the group limit can never bite (groups ranked by their best)
        routed_scaling_factor=1.5,
        **{**TINY, **DEEPSEEK_ATTN},
    )
    return config, experts_impl


def build_deepseek_v3(experts_impl="grouped_mm"):
    config = transformers.DeepseekV3Config(
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=E,
        n_shared_experts=1,
        moe_intermediate_size=16,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        **{**TINY, **DEEPSEEK_ATTN},
    )
    return config, experts_impl


def make_model(builder, seed=0):
    config, experts_impl = builder()
    config._experts_implementation = experts_impl
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    _sharpen_routers(model)
    for module in model.modules():  # DeepSeek-V3: a non-zero correction bias, so choosing and weighing differ
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.copy_(torch.randn_like(module.e_score_correction_bias) * 0.5)
    return model


def expected_routing(model, layer, logits_TE):
    """``layer``: the MoE layer index (DeepSeek-V3's correction bias is per layer)."""
    config = model.config
    if config.model_type == "deepseek_v3":
        gate = model.get_submodule(find_moe_sites(model)[layer].block_name).gate
        return deepseek_v3_rule(logits_TE, config, gate.e_score_correction_bias)
    if config.model_type == "deepseek_v2":
        return deepseek_v2_rule(logits_TE, config)
    return softmax_topk(logits_TE, config)


# ---------------------------------------------------------------------------------------------------------------------
# Reading a trace back
# ---------------------------------------------------------------------------------------------------------------------


def load_shards(trace_dir):
    shards = [np.load(p) for p in sorted(trace_dir.glob("rank000-*.npz"))]
    assert shards, f"no shards under {trace_dir}"
    return {k: np.concatenate([s[k] for s in shards]) for k in ("layer", "step", "expert_ids", "weights")}


def coactivation_from_rows(rows, num_layers, num_experts):
    counts = np.zeros((num_layers, num_experts, num_experts), np.int64)
    for layer, ids in zip(rows["layer"], rows["expert_ids"]):
        chosen = sorted({int(i) for i in ids if i >= 0})
        for i in chosen:
            for j in chosen:
                counts[layer, i, j] += 1
    return counts


def sorted_by_id(ids_TK, weights_TK):
    """Top-k order is not part of the routing (DeepSeek uses sorted=False): compare slots ordered by expert id."""
    ids_TK, weights_TK = torch.as_tensor(ids_TK).long(), torch.as_tensor(weights_TK).float()
    order = ids_TK.argsort(dim=-1)
    return ids_TK.gather(1, order), weights_TK.gather(1, order)


def assert_routing_equal(rows, layer, expected_ids_TK, expected_weights_TK):
    mine = rows["layer"] == layer
    got_ids, got_w = sorted_by_id(rows["expert_ids"][mine], rows["weights"][mine])
    want_ids, want_w = sorted_by_id(expected_ids_TK, expected_weights_TK)
    assert torch.equal(got_ids, want_ids), f"MoE layer {layer}: recorded expert ids differ from the router's"
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------

FAMILIES = {
    "mixtral": (build_mixtral, 2),
    "qwen2_moe": (build_qwen2_moe, 2),
    "qwen3_moe": (build_qwen3_moe, 2),
    "olmoe": (build_olmoe, 2),
    "deepseek_v2": (build_deepseek_v2, 2),
    "deepseek_v3": (build_deepseek_v3, 2),
}


def _recorder_for(model, out_dir, **kwargs):
    return RoutingTraceRecorder(out_dir, **hf_moe_shape(model), source="test", **kwargs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_recorded_ids_are_the_routers(family, tmp_path):
    builder, moe_layers = FAMILIES[family]
    model = make_model(builder)
    assert hf_moe_shape(model) == {"num_layers": moe_layers, "num_experts": E, "top_k": K}
    recorder = _recorder_for(model, tmp_path)
    input_ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    with attach_hf_routing_hooks(model, recorder), torch.no_grad():
        out = model(input_ids=input_ids, output_router_logits=True)
    recorder.close()
    assert len(out.router_logits) == moe_layers
    rows = load_shards(tmp_path)
    for layer, logits_TE in enumerate(out.router_logits):
        assert logits_TE.shape == (input_ids.numel(), E)
        assert_routing_equal(rows, layer, *expected_routing(model, layer, logits_TE))


def test_layer_indices_skip_dense_layers(tmp_path):
    model = make_model(build_qwen2_moe)
    with attach_hf_routing_hooks(model, _recorder_for(model, tmp_path)) as handles:
        assert handles.layers == [(0, "model.layers.0.mlp.experts"), (1, "model.layers.2.mlp.experts")]


def test_eager_experts_are_hooked_too(tmp_path):
    """The pre-hook sees the same arguments whichever experts kernel HF dispatches to."""
    model = make_model(lambda: build_mixtral("eager"))
    recorder = _recorder_for(model, tmp_path)
    input_ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    with attach_hf_routing_hooks(model, recorder), torch.no_grad():
        out = model(input_ids=input_ids, output_router_logits=True)
    recorder.close()
    rows = load_shards(tmp_path)
    for layer, logits_TE in enumerate(out.router_logits):
        assert_routing_equal(rows, layer, *expected_routing(model, layer, logits_TE))


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_coactivation_matches_shards(family, tmp_path):
    model = make_model(FAMILIES[family][0])
    batches = [torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    recorder = trace_hf_model(model, tmp_path, batches, TraceConfig(shard_rows=16))
    shape = hf_moe_shape(model)
    rows = load_shards(tmp_path)
    assert len(list(tmp_path.glob("rank000-*.npz"))) > 1  # several shards, not one
    assert sorted(set(rows["step"].tolist())) == [0, 1, 2]
    recomputed = coactivation_from_rows(rows, shape["num_layers"], E)
    np.testing.assert_array_equal(recorder.coactivation.numpy(), recomputed)
    counts = np.load(tmp_path / "counts-rank000.npz")
    np.testing.assert_array_equal(counts["coactivation"], recomputed)
    assert recorder.tokens.tolist() == [3 * 2 * 9] * shape["num_layers"]
    header = json.loads((tmp_path / "header.json").read_text())
    assert (header["num_layers"], header["num_experts"], header["top_k"]) == (shape["num_layers"], E, K)
    assert header["model_type"] == family
    assert not model.training


def test_remove_stops_recording(tmp_path):
    model = make_model(build_olmoe)
    recorder = _recorder_for(model, tmp_path)
    handles = attach_hf_routing_hooks(model, recorder)
    input_ids = torch.randint(0, VOCAB, (1, 4))
    with torch.no_grad():
        model(input_ids=input_ids)
        handles.remove()
        model(input_ids=input_ids)
    assert recorder.tokens.tolist() == [4, 4]


def test_no_moe_layers_is_a_clear_error(tmp_path):
    dense = transformers.MistralForCausalLM(transformers.MistralConfig(num_hidden_layers=1, **TINY))
    with pytest.raises(ValueError, match=r"MistralForCausalLM: no MoE layers found.*'experts'"):
        hf_moe_shape(dense)
    recorder = RoutingTraceRecorder(tmp_path, num_layers=1, num_experts=E, top_k=K, source="test")
    with pytest.raises(ValueError, match=r"Linear: no MoE layers found"):
        attach_hf_routing_hooks(nn.Linear(4, 4), recorder)


def test_recorder_shape_mismatch_is_an_error(tmp_path):
    model = make_model(build_mixtral)
    recorder = RoutingTraceRecorder(tmp_path, num_layers=3, num_experts=E, top_k=K, source="test")
    with pytest.raises(ValueError, match="2 MoE layers, the recorder was built for 3"):
        attach_hf_routing_hooks(model, recorder)


def test_out_of_range_ids_become_empty_slots():
    ids_TK = torch.tensor([[0, 8], [3, -1], [7, 2]])
    assert normalize_expert_ids(ids_TK, 8, 2).tolist() == [[0, -1], [3, -1], [7, 2]]


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed AutoEP
# ---------------------------------------------------------------------------------------------------------------------


def autoep_convert(model, preset):
    """AutoEP's own detection and replacement at ep_size 1 (no process group needed).

    The specs get the no-op preset adapter: deepspeed 0.19.8's Mixtral/Qwen adapter re-targets transformers'
    router-logit recorders through ``_CAN_RECORD_REGISTRY.get(key, default)``, which transformers 5.23's registry
    (``get(model)``) rejects with a TypeError. The replacement itself does not depend on the adapter.
    """
    auto_ep = pytest.importorskip("deepspeed.module_inject.auto_ep")
    from deepspeed.module_inject.auto_ep_config import AutoEPConfig

    autoep = auto_ep.AutoEP(model, AutoEPConfig(enabled=True, autoep_size=1, preset_model=preset))
    specs = [dataclasses.replace(s, preset_adapter="default") for s in autoep.ep_parser()]
    autoep.replace_moe_layers(specs, ep_size=1, ep_rank=0)
    return model


@pytest.mark.parametrize("family,preset", [("mixtral", "mixtral"), ("qwen3_moe", "qwen3_moe")])
def test_autoep_converted_model(family, preset, tmp_path):
    model = autoep_convert(make_model(FAMILIES[family][0]), preset)
    sites = find_moe_sites(model)
    assert [s.kind for s in sites] == ["autoep", "autoep"]
    assert [s.hook_name for s in sites] == ["model.layers.0.mlp.router", "model.layers.1.mlp.router"]
    assert hf_moe_shape(model) == {"num_layers": 2, "num_experts": E, "top_k": K}
    _sharpen_routers(model)

    layer_inputs = {}
    hooks = [
        model.get_submodule(s.block_name).register_forward_pre_hook(
            lambda mod, args, i=s.layer_index: layer_inputs.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))
        )
        for s in sites
    ]
    batches = [torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(3))]
    recorder = trace_hf_model(model, tmp_path, batches)
    for hook in hooks:
        hook.remove()

    rows = load_shards(tmp_path)
    with torch.no_grad():
        for site in sites:
            layer = model.get_submodule(site.block_name)
            assert layer.expert_bias is None  # no load-balancing bias in this config: routing is the gate's alone
            assert_routing_equal(rows, site.layer_index, *autoep_rule(layer.router, layer_inputs[site.layer_index]))
    np.testing.assert_array_equal(recorder.coactivation.numpy(), coactivation_from_rows(rows, 2, E))
    assert json.loads((tmp_path / "header.json").read_text())["router"] == "autoep:TokenChoiceTopKRouter"
