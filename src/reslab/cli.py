"""`reslab` command line: one subcommand per job, each a thin layer over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _fmt_count(x: float) -> str:
    return f"{x / 1e9:.2f}G" if x >= 1e9 else f"{x / 1e6:.2f}M"


def cmd_models(args: argparse.Namespace) -> int:
    """Print the model zoo with our parameter and multiply-add counts beside the paper's."""
    from reslab.analysis.complexity import count_macs, count_params
    from reslab.models import create_model, list_models, model_info

    rows = []
    for name in list_models(args.family):
        info = model_info(name)
        model = create_model(name)
        params, macs = count_params(model), count_macs(model, info.input_size)
        opts = {**info.defaults}
        shortcut = (
            "-"
            if info.family == "alexnet"
            else opts.get("shortcut", "A" if info.family == "cifar" else "B")
        )
        if opts.get("residual") is False:
            shortcut = "none"
        rows.append([
            name, info.family, str(info.depth), f"{info.input_size}px", shortcut,
            _fmt_count(params), "" if info.paper_params is None else _fmt_count(info.paper_params),
            _fmt_count(macs), "" if info.paper_macs is None else _fmt_count(info.paper_macs),
            "" if info.paper_error is None else f"{info.paper_error:.2f}",
        ])  # fmt: skip
    head = ["model", "family", "depth", "input", "shortcut", "params", "paper",
            "mult-adds", "paper", "paper top-1 err %"]  # fmt: skip
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print("\nImageNet mult-adds are for the paper's v1 (stride on the bottleneck's first 1x1).")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo with parameter and FLOP counts")
    p.add_argument("--family", choices=["imagenet", "cifar", "alexnet"], default=None)
    p.set_defaults(func=cmd_models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reslab", description="Deep residual learning (He et al., 2015): models, training, "
        "reproduction of the paper's tables and figures."
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_models,):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
