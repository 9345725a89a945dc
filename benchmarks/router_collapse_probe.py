"""Why does the default router collapse at d_model 2048, 64 experts, top-8? A per-step probe (issue 11).

Trains the small GPT (plain torch AdamW, fp32, torch expert backend; no DeepSpeed, so a variant is one process and
seconds on a GPU) and prints, per step and MoE layer, the expert load imbalance (max / mean tokens per expert) and the
mean pairwise cosine of the router's inputs (||mean of unit rows||^2: 0 for unrelated tokens, 1 when every token
shows the router the same vector, whatever the router does then).

Variants, each a knob of the diagnosis in docs/gpu_runs.md:
    --emb-factor F     multiply token and position embeddings by F in the forward (F = sqrt(d): the Transformer's
                       embedding scale), to see whether the collapse is already in the initial residual stream
    --lr-base-width W  scale the learning rate of the hidden matrices by min(1, W / d_model) (muP-like width scaling)
    --center           subtract the batch mean from the router's input (routing on what differs between tokens)
    --standardize      per feature: minus the batch mean, over the batch std (what differs, at unit scale)
    --untie            separate input embedding and output head (c2r's GPT ties them by default, as GPT-2 does)
    --router JSON      RouterConfig fields as JSON, e.g.
                       '{"kind": "group_limited", "group_limited": {"bias_update_rate": 1e-3}}' or
                       '{"balance": "batch"}' (the per-batch balancing bias, c2r/routing/balance.py)

    python benchmarks/router_collapse_probe.py --d-model 2048 --layers 4 --steps 40
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from c2r.config_utils import config_from_dict
from c2r.data import BatchSampler, DataConfig, load_corpus
from c2r.experts import ExpertConfig
from c2r.model import ModelConfig, MoEGPT
from c2r.moe import MoEConfig
from c2r.routing import RouterConfig, after_optimizer_step


def mean_pairwise_cosine(x_TD: torch.Tensor) -> float:
    unit_TD = torch.nn.functional.normalize(x_TD.float(), dim=1)
    return float(unit_TD.mean(0).norm() ** 2)


def standardize(x_TD: torch.Tensor) -> torch.Tensor:
    """Each feature minus its batch mean, over its batch std (statistics detached, as batch norm without affine)."""
    x = x_TD.float()
    mean_D, std_D = x.mean(0).detach(), x.std(0).detach()
    return ((x - mean_D) / (std_D + 1e-5)).to(x_TD.dtype)


def build(args, device: torch.device) -> MoEGPT:
    router = config_from_dict(RouterConfig, json.loads(args.router), "--router")
    moe = MoEConfig(
        num_experts=args.experts,
        top_k=args.top_k,
        ffn_hidden_size=args.ffn,
        router=router,
        experts=ExpertConfig(backend="torch"),
    )
    config = ModelConfig(
        n_layer=args.layers,
        n_head=16,
        d_model=args.d_model,
        block_size=args.seq,
        moe=moe,
        tie_embeddings=not args.untie,
    )
    torch.manual_seed(args.seed)
    model = MoEGPT(config).to(device)
    if args.emb_factor != 1.0:
        for emb in (model.tok_emb, model.pos_emb):
            emb.register_forward_hook(lambda module, inputs, out: out * args.emb_factor)
    if args.center:
        for layer in model.moe_layers():
            layer.router.register_forward_pre_hook(lambda module, inputs: (inputs[0] - inputs[0].mean(0).detach(),))
    if args.standardize:
        for layer in model.moe_layers():
            layer.router.register_forward_pre_hook(lambda module, inputs: (standardize(inputs[0]),))
    return model


def optimizer(model: MoEGPT, args) -> torch.optim.Optimizer:
    hidden = [p for n, p in model.named_parameters() if p.ndim >= 2 and "emb" not in n and "head" not in n]
    others = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "emb" not in n and "head" not in n)]
    scale = min(1.0, args.lr_base_width / args.d_model) if args.lr_base_width else 1.0
    groups = [{"params": hidden, "lr_scale": scale}, {"params": others, "lr_scale": 1.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=128, help="expert FFN width (small: the probe is about routing)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (c2r-train's default)")
    parser.add_argument("--warmup", type=int, default=30, help="linear warm-up steps (c2r-train's default)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5, help="print every N steps")
    parser.add_argument("--router", default="{}", help="RouterConfig fields as JSON")
    parser.add_argument("--emb-factor", type=float, default=1.0, help="0: sqrt(d_model)")
    parser.add_argument("--lr-base-width", type=float, default=0.0)
    parser.add_argument("--center", action="store_true")
    parser.add_argument("--standardize", action="store_true", help="router input: per feature, minus batch mean, / std")
    parser.add_argument("--untie", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.emb_factor == 0:
        args.emb_factor = math.sqrt(args.d_model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(args, device)
    opt = optimizer(model, args)
    corpus = load_corpus(DataConfig())
    batches = BatchSampler(corpus.train, args.seq, args.batch, seed=args.seed)
    router_inputs: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(model.moe_layers()):
        layer.register_forward_pre_hook(lambda m, a, i=index: router_inputs.__setitem__(i, a[0].detach()))
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = group["lr_scale"] * args.lr * min(1.0, (step + 1) / args.warmup)
        out = model(*batches.batch_at(step, device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        after_optimizer_step(model)
        if step % args.every == 0 or step == args.steps - 1:
            cells = []
            for i, routing in enumerate(out.routing):
                load_E = routing.tokens_per_expert_E.float()
                x_TD = router_inputs[i].reshape(-1, args.d_model)
                cells.append(f"L{i} imb {float(load_E.max() / load_E.mean()):.1f} cos {mean_pairwise_cosine(x_TD):.2f}")
            print(f"step {step:3d} loss {out.lm_loss.item():.2f} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
