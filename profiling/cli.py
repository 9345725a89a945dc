"""``c2r-profile``: read what ``c2r-train --profile`` recorded.

c2r-profile summarize runs/before                      # headline numbers per MoE layer, in the terminal
c2r-profile dashboard runs/before -o report.html       # one self-contained HTML file, opens offline
c2r-profile dashboard runs/before runs/after -o compare.html   # before/after (e.g. contiguous vs a plan)
c2r-profile coactivation runs/before -o coact.npy      # [L, E, E] counts for the placement planner
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

from profiling.cli_errors import BAD_INPUT_ERRORS, OneLineParser
from profiling.summary import coactivation_matrix, format_summary, summarize


def cmd_summarize(args: argparse.Namespace) -> int:
    summary = summarize(args.run)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_coactivation(args: argparse.Namespace) -> int:
    counts = coactivation_matrix(args.run)
    out = args.out if str(args.out).endswith(".npy") else f"{args.out}.npy"  # the name np.save writes
    np.save(out, counts)
    print(f"wrote {out}: co-activation counts of shape {list(counts.shape)} [layers, experts, experts]")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from profiling.dashboard import write_dashboard

    if len(args.runs) > 2:
        raise ValueError(f"dashboard takes one run, or two to compare; got {len(args.runs)}")
    names = args.names.split(",") if args.names else None
    write_dashboard(args.runs, args.out, names, args.window)
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="c2r-profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summarize", help="print per-layer traffic, copies per token, load and all-to-all time")
    p.add_argument("run", help="run directory (with profile/) or profile directory")
    p.add_argument("--json", action="store_true", help="the whole summary as JSON")
    p.set_defaults(func=cmd_summarize)
    p = sub.add_parser("dashboard", help="self-contained HTML dashboard of one run, or of two runs side by side")
    p.add_argument("runs", nargs="+", metavar="run", help="one run directory, or two (before, after)")
    p.add_argument("-o", "--out", default="report.html", help="output HTML file (default report.html)")
    p.add_argument("--names", help="comma-separated labels for the runs (default: their directory names)")
    p.add_argument(
        "--window",
        type=int,
        metavar="N",
        help="two runs: compare the last N profiled steps of each (default: the shorter run's profiled step count)",
    )
    p.set_defaults(func=cmd_dashboard)
    p = sub.add_parser("coactivation", help="export the online co-activation counts as .npy for c2r-place")
    p.add_argument("run", help="run directory (with profile/) or profile directory")
    p.add_argument("-o", "--out", default="coactivation.npy", help="output .npy (default coactivation.npy)")
    p.set_defaults(func=cmd_coactivation)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BAD_INPUT_ERRORS as error:
        print(f"c2r-profile {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
