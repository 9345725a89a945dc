"""``c2r-route``: tools for routers that need something made before training.

c2r-route collaborators runs/topk --out lists.npz            # C2R lists from a run profiled with --profile
c2r-route collaborators --coactivation coact.npy --out lists.npz
c2r-train --router c2r --set model.moe.router.c2r.collaborators=lists.npz --set model.moe.router.c2r.top_t=4

The summary shows, for several T, how much of the profiled co-activation C2R would keep: the fraction of
(anchor, partner) pairs of the profile whose partner is among the anchor's first T collaborators.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from c2r.routing.collaborators import save_collaborators
from profiling.cli_errors import BAD_INPUT_ERRORS, OneLineParser


def pair_coverage(coactivation_EE: np.ndarray, lists_EE: np.ndarray, top_t: int) -> float:
    """Fraction of off-diagonal co-activation mass whose partner is in the first ``top_t`` of the row's list."""
    counts = np.asarray(coactivation_EE, dtype=np.float64).copy()
    np.fill_diagonal(counts, 0)
    kept = np.take_along_axis(counts, lists_EE[:, :top_t], axis=1).sum()
    return float(kept / max(counts.sum(), 1.0))


def npy_magic(path: Path) -> bytes:
    with path.open("rb") as file:
        return file.read(6)


def load_counts(args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """[L, E, E] co-activation counts from a .npy file, a run or profile directory (the online counters: every
    token), or a trace directory (its counters if present, else the written trace shards, e.g. from HF hooks)."""
    if args.coactivation:
        from placement.inputs import validate_coactivation

        path = Path(args.coactivation)
        # numpy's own errors do not name the file, and call random bytes "pickled (object) data"
        if path.is_file() and npy_magic(path) != b"\x93NUMPY":
            raise ValueError(f"{str(path)!r} is not a .npy file (no NumPy header); expected [L, E, E] or [E, E] counts")
        try:
            counts = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as error:
            raise ValueError(f"{str(path)!r} is not a readable .npy co-activation file ({error})") from None
        return validate_coactivation(counts), str(args.coactivation)
    if not args.run:
        raise ValueError("give a profiled run directory, a trace directory or --coactivation FILE.npy")
    path = Path(args.run)
    if (path / "header.json").exists() or any(path.glob("counts-rank*.npz")):
        from profiling.reader import coactivation_from_traces, read_online_counts, read_traces

        if any(path.glob("counts-rank*.npz")):
            return read_online_counts(path)[0], str(path)
        return coactivation_from_traces(read_traces(path)), str(path)
    from profiling.summary import coactivation_matrix

    return coactivation_matrix(path), str(path)


def cmd_collaborators(args: argparse.Namespace) -> int:
    counts, source = load_counts(args)
    lists = save_collaborators(
        args.out, counts, {"source": source, "pairs_per_layer": counts.sum(axis=(1, 2)).tolist()}
    )
    num_layers, num_experts = lists.shape[0], lists.shape[-1]
    print(f"wrote {args.out}: collaborator lists for {num_layers} MoE layers of {num_experts} experts (from {source})")
    ts = sorted({t for t in (1, 2, 4, num_experts // 4, num_experts // 2, num_experts - 1) if 1 <= t < num_experts})
    print("share of profiled co-activation kept by the first T collaborators:")
    print("layer  " + "  ".join(f"T={t:<4}" for t in ts))
    for layer in range(num_layers):
        row = "  ".join(f"{pair_coverage(counts[layer], lists[layer], t):6.3f}" for t in ts)
        print(f"{layer:>5}  {row}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="c2r-route", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    lists = sub.add_parser("collaborators", help="C2R collaborator lists from a profiled run or co-activation counts")
    lists.add_argument(
        "run", nargs="?", help="run directory of c2r-train --profile, its profile/ or profile/traces/ directory"
    )
    lists.add_argument("--coactivation", type=Path, help="[L, E, E] or [E, E] counts (.npy) instead of a run")
    lists.add_argument("--out", "-o", required=True, type=Path, help="output .npz")
    lists.set_defaults(func=cmd_collaborators)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BAD_INPUT_ERRORS as error:
        print(f"c2r-route {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
