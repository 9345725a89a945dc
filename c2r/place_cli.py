"""``c2r-place``: placement's planning CLI (plan, evaluate, export) plus ``apply``, which moves experts between the
ranks' files of a c2r-train checkpoint. ``placement`` never imports c2r, so the subcommand that needs the training
system's checkpoint format is added here, one layer up; ``python -m placement.cli`` keeps the other three."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from placement import cli as placement_cli
from placement.plan import load_plan


def _continue_hint(written: Path, saved: dict) -> str:
    """``(N > step)``: the step the checkpoint holds (its tag is step<N>; else the saved run's length)."""
    from c2r.deepspeed.checkpoint import tag_step

    step = tag_step(written.name)
    return f"(N > {saved['train']['steps'] if step is None else step})"


def cmd_apply(args: argparse.Namespace) -> int:
    # torch and DeepSpeed load for this subcommand only: plan / evaluate / export stay quick to start
    from c2r.deepspeed.apply_plan import apply_plan
    from c2r.deepspeed.checkpoint import CONFIG_FILE
    from c2r.deepspeed.reshard import saved_world_size

    plan = load_plan(args.plan)
    written = apply_plan(plan.layouts, args.checkpoint, args.out, tag=args.tag, plan_path=args.plan)
    # The resumed run needs the plan's ranks and the settings it was trained with (the saved config holds them).
    saved = json.loads((written / CONFIG_FILE).read_text())
    optimizer_state, ranks = saved["optimizer_state"], plan.num_ranks
    world = saved.get("world_size") or saved_world_size(written)  # apply keeps the ranks (ep_size is the plan's)
    print(
        f"wrote {written}: experts moved to the plan's ranks; optimizer state {optimizer_state}; continue with "
        f"`{launch_command(world, ranks)} --config {written / CONFIG_FILE} --resume --plan {args.plan} "
        f"--out {Path(args.out).parent} --steps N` {_continue_hint(written, saved)}"
    )
    return 0


def launch_command(ranks: int, ep_size: int) -> str:
    """How to start c2r-train on ``ranks`` ranks, runnable as printed: the checkout's launcher script (it also sets
    OMP_NUM_THREADS and Ctrl-C handling), or, for an installed package without it, the venv's own deepspeed."""
    script = Path(__file__).resolve().parents[1] / "launch" / "quickstart.sh"
    if script.is_file():
        relative = os.path.relpath(script)
        shown = script if relative.startswith("..") else relative
        return f"NUM_RANKS={ranks} EP_SIZE={ep_size} bash {shown}"
    return f"{Path(sys.executable).parent / 'deepspeed'} --num_gpus {ranks} --module c2r.train --ep-size {ep_size}"


def add_apply_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "apply",
        help="move experts between ranks' files of a c2r-train DeepSpeed checkpoint; the model is unchanged",
        description="Renames each expert's checkpoint file (and the slot in its keys) from its old rank/slot to the "
        "plan's, and moves its rows of the fp32 master weights and Adam moments between the ranks' optimizer files "
        "(ZeRO 0/1/2, fp32 or bf16). An optimizer layout it does not know is dropped and flagged: the resumed run "
        "then loads the weights and starts Adam's moments afresh at the same step.",
    )
    p.add_argument("--plan", required=True, help="plan file (c2r-place plan)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (RUN/checkpoints, with 'latest')")
    p.add_argument("--out", required=True, help="new checkpoint directory (e.g. RUN2/checkpoints)")
    p.add_argument("--tag", help="checkpoint tag (default: the one 'latest' names)")
    p.set_defaults(func=cmd_apply)


def cmd_reshard(args: argparse.Namespace) -> int:
    from c2r.deepspeed.checkpoint import CONFIG_FILE
    from c2r.deepspeed.reshard import reshard

    if args.world_size < 1:
        raise ValueError(f"--world-size must be at least 1, got {args.world_size}")
    plan = load_plan(args.plan) if args.plan else None
    ep_size = args.ep_size or (plan.num_ranks if plan else args.world_size)
    layouts = plan.layouts if plan else None
    written = reshard(args.checkpoint, args.out, args.world_size, ep_size, layouts, tag=args.tag, plan_path=args.plan)
    saved = json.loads((written / CONFIG_FILE).read_text())
    batch = saved["train"]["batch_size"]
    plan_flag = f" --plan {args.plan}" if args.plan else ""
    print(
        f"wrote {written}: {args.world_size} ranks, ep_size {ep_size}, {batch} sequences per rank; optimizer state "
        f"{saved['optimizer_state']}; continue with `{launch_command(args.world_size, ep_size)} "
        f"--config {written / CONFIG_FILE} --out {Path(args.out).parent} --resume "
        f"--set train.batch_size={batch}{plan_flag} --steps N` {_continue_hint(written, saved)}"
    )
    return 0


def add_reshard_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reshard",
        help="convert a c2r-train checkpoint to another number of ranks / ep_size (same or new placement)",
        description="Writes the checkpoint as DeepSpeed would have saved it from --world-size ranks with experts over "
        "--ep-size of them: expert files renamed for the new placement, the fp32 master weights and Adam moments of "
        "every parameter re-partitioned (ZeRO 0/1/2), the same global batch (batch_size per rank scaled). Resume "
        "it with c2r-train --resume on the new number of ranks (the command is printed).",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (RUN/checkpoints, with 'latest')")
    p.add_argument("--out", required=True, help="new checkpoint directory (e.g. RUN2/checkpoints)")
    p.add_argument("--world-size", type=int, required=True, help="ranks (GPUs) of the resumed run")
    p.add_argument("--ep-size", type=int, help="expert-parallel ranks (default: the plan's, else --world-size)")
    p.add_argument("--plan", help="placement plan for the new ep_size (default: contiguous experts)")
    p.add_argument("--tag", help="checkpoint tag (default: the one 'latest' names)")
    p.set_defaults(func=cmd_reshard)


# The order `c2r-place --help` lists them in.
COMMANDS = (
    placement_cli.add_plan_command,
    placement_cli.add_evaluate_command,
    add_apply_command,
    add_reshard_command,
    placement_cli.add_export_command,
    placement_cli.add_simulate_command,
)


def main(argv: list[str] | None = None) -> int:
    return placement_cli.main(argv, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
