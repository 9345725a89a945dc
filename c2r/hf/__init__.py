"""Hugging Face MoE models on c2r: convert their MoE blocks to our layers (same function), load checkpoints with
only this rank's experts, and export back to the original architecture.

    model = c2r.hf.load("path/to/model", ep_rank=0, ep_size=1)          # or c2r.hf.convert(hf_model)
    logits = model(input_ids).logits; loss = ... + c2r.hf.aux_loss(model)
    c2r.hf.export(model, "out/")                                         # AutoModelForCausalLM.from_pretrained("out/")

Modules: ``architectures`` (the table of supported families), ``block`` (the converted block), ``routers``
(native and switched routers), ``weights`` (expert layouts), ``convert``, ``checkpoint`` (streaming safetensors),
``load``, ``export``; ``training`` (``c2r-train --hf-model``: the ``hf`` config section, the model under DeepSpeed)
and ``export_cli`` (``c2r-export-hf``: a run's checkpoint back to Hugging Face).
"""

from c2r.hf.architectures import ARCHITECTURES, Architecture
from c2r.hf.block import HFMoEBlock, attach_expert_parallel, aux_loss, converted_blocks, routing_results
from c2r.hf.convert import HFConversion, convert
from c2r.hf.export import export, hf_state_dict
from c2r.hf.load import load

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "HFConversion",
    "HFMoEBlock",
    "attach_expert_parallel",
    "aux_loss",
    "convert",
    "converted_blocks",
    "export",
    "hf_state_dict",
    "load",
    "routing_results",
]
