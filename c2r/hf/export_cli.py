"""``c2r-export-hf RUN_DIR --out DIR``: a ``c2r-train --hf-model`` run's checkpoint back to a Hugging Face checkpoint.

1. The run's ``c2r_config.json`` names the source model directory, the router, k and each MoE layer's expert layout.
2. The converted model is built whole in one process (every expert, logical order; no process group needed).
3. Non-expert weights come from DeepSpeed's ``mp_rank_00_model_states.pt``; each expert from its own file
   ``layer_<l>_expert_<physical id>_...`` (its home slot's), put back at its logical id through the recorded layout,
   so the export is the same whatever placement the run trained with.
4. :func:`c2r.hf.export` writes the original architecture with ``save_pretrained`` (tokenizer files copied from the
   source directory); a router that architecture cannot express is one error line naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from c2r.config_utils import config_from_dict

MODEL_FILE = "mp_rank_00_model_states.pt"
WRAPPER = ".moe.deepspeed_moe."  # DeepSpeed's MoE module around each block's layer (c2r.deepspeed.wrap_moe_layers)


def _run_config(run: str | Path) -> tuple[Path, dict[str, Any]]:
    from c2r.deepspeed.checkpoint import CONFIG_FILE, resolve_checkpoint

    ckpt_dir, tag = resolve_checkpoint(run)
    saved = json.loads((ckpt_dir / tag / CONFIG_FILE).read_text())
    if not (saved.get("hf") or {}).get("model_dir"):
        raise ValueError(f"{ckpt_dir / tag} was not trained with --hf-model (its run config has no hf.model_dir)")
    return ckpt_dir / tag, saved


def _whole_model(saved: dict[str, Any]) -> nn.Module:
    """The converted model of the run's settings, on one process with every expert."""
    from c2r.hf.load import load
    from c2r.hf.training import switched_router
    from c2r.moe import MoEConfig

    moe = config_from_dict(MoEConfig, saved["model"]["moe"])
    return load(
        saved["hf"]["model_dir"],
        router=switched_router(moe),
        top_k=moe.top_k,
        aux_loss_weight=moe.router.aux_loss_weight,
        experts=dataclasses.replace(moe.experts, activation="swiglu"),
    )


@torch.no_grad()
def load_run_weights(model: nn.Module, tag_dir: Path, saved: dict[str, Any]) -> None:
    """Fill ``model`` (whole, unwrapped) with the checkpoint in ``tag_dir``."""
    from c2r.deepspeed.checkpoint import recorded_layouts
    from c2r.hf.block import converted_blocks

    module = torch.load(tag_dir / MODEL_FILE, map_location="cpu", weights_only=False)["module"]
    state = {key.removeprefix("hf.").replace(WRAPPER, ".moe."): value for key, value in module.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    expert_params = {f"{name}.moe.experts.{w}" for name, _ in converted_blocks(model) for w in ("w1", "v1", "w2")}
    if unexpected or set(missing) - expert_params:
        raise ValueError(
            f"{tag_dir} does not fit {saved['hf']['model_dir']}: missing {missing}, unexpected {unexpected}"
        )
    for index, ((_, block), layout) in enumerate(zip(converted_blocks(model), recorded_layouts(saved), strict=True)):
        experts, F = block.layer.experts, block.layer.experts.ffn_hidden_size
        for logical, physical in enumerate(layout.logical_to_physical.tolist()):  # a replicated one: its home's file
            path = tag_dir / f"layer_{index}_expert_{physical}_mp_rank_00_model_states.pt"
            if not path.exists():
                raise FileNotFoundError(f"expert file {path} is missing")
            tensors = torch.load(path, map_location="cpu", weights_only=False)
            for key, tensor in tensors.items():
                weight = key.rsplit(".", 1)[1]  # ...deepspeed_experts.<physical>.<w1|v1|w2>
                getattr(experts, weight)[logical * F : (logical + 1) * F] = tensor


def export_run(run: str | Path, out_dir: str | Path) -> Path:
    """Write the Hugging Face checkpoint of ``run`` (a run dir, its checkpoints dir or one tag dir) to ``out_dir``."""
    from c2r.hf.export import check_exportable, export

    tag_dir, saved = _run_config(run)
    model = _whole_model(saved)
    check_exportable(model)  # before reading the checkpoint: a router the architecture cannot express
    load_run_weights(model, tag_dir, saved)
    return export(model, out_dir, tokenizer_dir=saved["hf"]["model_dir"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="c2r-export-hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", metavar="RUN_DIR", help="c2r-train --hf-model output dir, its checkpoints/ or a tag dir")
    parser.add_argument("--out", required=True, help="directory for the Hugging Face checkpoint")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run, args.out)
    except (ValueError, FileNotFoundError) as error:  # one line and exit status 2, as every c2r command's bad input
        print(f"c2r-export-hf: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} (transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
