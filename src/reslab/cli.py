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


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate one checkpoint, or several as an ensemble (softmax scores averaged)."""
    from pathlib import Path

    from reslab.data.cifar import DataError
    from reslab.engine.eval_run import format_report, run_eval, write_outputs

    try:
        result, members, classes = run_eval(
            checkpoints=args.checkpoint or (),
            weights=args.weights,
            model_name=args.model,
            labels_file=args.labels,
            workers=args.workers,
            data=args.data,
            dataset=args.dataset,
            split=args.split,
            views=args.views,
            scales=args.scales,
            batch_size=args.batch_size,
            device=args.device,
            precision=args.precision,
            limit=args.limit,
        )
    except (DataError, ValueError, FileNotFoundError) as e:  # WeightsError is a ValueError
        print(f"reslab eval: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.dataset} {args.split}, {args.views} view(s), {result.ensemble.num_samples} "
        f"images, {args.precision}"
    )
    print(format_report(result, classes))
    files = args.checkpoint or [args.weights]
    out = Path(args.out) if args.out else Path(files[0]).parent / "eval"
    meta = {
        "checkpoints": [str(p) for p in files],
        "models": [m.model_name for m in members],
        "dataset": args.dataset,
        "split": args.split,
        "views": args.views,
        "precision": args.precision,
        "limit": args.limit,
    }
    written = write_outputs(
        result, classes, out_dir=out, json_path=Path(args.json) if args.json else None, meta=meta
    )
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="top-1/top-5 error, per-class accuracy, confusion matrix; "
        "several checkpoints are evaluated as an ensemble",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        nargs="+",
        metavar="FILE",
        help="reslab checkpoint(s); several = an ensemble",
    )
    src.add_argument(
        "--weights",
        metavar="FILE",
        help="weights in another format (torchvision, "
        "pytorch_resnet_cifar10 .th, safetensors); with --model",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="NAME",
        help="architecture for --weights (default: detected from the file)",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="directory holding the data set")
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "folder"], default="cifar10")
    p.add_argument(
        "--labels",
        default=None,
        metavar="FILE",
        help="label file of a flat folder (ImageNet val layout), --dataset folder",
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for folders")
    p.add_argument("--split", choices=["test", "val5k"], default="test")
    p.add_argument("--views", choices=["center", "ten-crop", "multi-scale"], default="center")
    p.add_argument(
        "--scales",
        type=int,
        nargs="+",
        default=None,
        help="input sides for --views multi-scale (default 32 40 48 for 32px "
        "models, 224 256 384 480 640 for ImageNet ones)",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="default 500 for CIFAR, 32 for folders"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument(
        "--json", default=None, metavar="OUT", help="JSON report path (default OUT_DIR/eval.json)"
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where confusion PNGs go (default: CHECKPOINT_DIR/eval)",
    )
    p.set_defaults(func=cmd_eval)


def cmd_plot(args: argparse.Namespace) -> int:
    """Figure-6-style training curves of one or more RUN_DIRs on one PNG."""
    from reslab.analysis.plots import load_runs, plot_curves

    try:
        runs = load_runs(args.run_dir)
        out = plot_curves(runs, out=args.out, title=args.title, test_key=args.test_key)
    except (FileNotFoundError, ValueError) as e:
        print(f"reslab plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="training curves (Figure 6 style) of RUN_DIRs to a PNG")
    p.add_argument("run_dir", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="curves.png", metavar="PNG")
    p.add_argument("--title", default=None)
    p.add_argument(
        "--test-key",
        default="test_error",
        help="metrics.jsonl field drawn bold (test_error or val_error)",
    )
    p.set_defaults(func=cmd_plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reslab",
        description="Deep residual learning (He et al., 2015): models, training, "
        "reproduction of the paper's tables and figures.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_models, _add_eval, _add_plot):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
