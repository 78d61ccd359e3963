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


def _train_config(args: argparse.Namespace):
    """Recipe, then --set assignments, then the explicit flags (which win)."""
    import os

    from reslab.engine.config import TrainConfig, load_recipe

    cfg = load_recipe(args.recipe) if args.recipe else TrainConfig()
    cfg = cfg.override(args.set or [])
    flags = {
        "model": args.model, "data": args.data, "dataset": args.dataset, "iters": args.iters,
        "epochs": args.epochs, "out": args.out, "device": args.device,
        "precision": args.precision, "seed": args.seed, "weights": args.weights,
        "num_classes": args.num_classes, "save_every": args.save_every,
        "eval_every": args.eval_every, "time_limit": args.time_limit,
        "channels_last": args.channels_last, "compile": args.compile or None,
        "download": args.download or None, "sync_bn": args.sync_bn or None,
    }  # fmt: skip
    for key, value in flags.items():
        if value is not None:
            setattr(cfg, key, value)
    if args.data is None and cfg.data == "data" and os.environ.get("RESLAB_DATA"):
        cfg.data = os.environ["RESLAB_DATA"]
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    import os

    if args.nproc and args.nproc > 1:
        return _relaunch_torchrun(args)
    from reslab.engine.trainer import train

    cfg = _train_config(args)
    final = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        print(_summary(final, cfg.out))
    return 0


def _summary(final: dict, out: str) -> str:
    errs = ", ".join(
        f"{k.removesuffix('_error')} error {final[k]:.2f}%" for k in ("val_error", "test_error")
        if k in final
    )  # fmt: skip
    return f"done: {final.get('iter', 0)} iterations, {errs}; run in {out}"


def _relaunch_torchrun(args: argparse.Namespace) -> int:
    """`reslab train --nproc N [--max-restarts K] ...` = `torchrun --standalone
    --nproc-per-node N --max-restarts K -m reslab train ...` (one machine)."""
    import subprocess

    argv, skip = [], False
    for a in args.argv:  # the command line without the launcher's own options
        if skip:
            skip = False
        elif a in ("--nproc", "--max-restarts"):
            skip = True
        elif not a.startswith(("--nproc=", "--max-restarts=")):
            argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc}", f"--max-restarts={args.max_restarts}",
           "-m", "reslab", *argv]  # fmt: skip
    return subprocess.call(cmd)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with one of the paper's recipes")
    p.add_argument("--recipe", help="recipe name in configs/ (e.g. cifar10-paper) or a YAML path")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--model")
    p.add_argument("--data", help="data directory (default $RESLAB_DATA)")
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "folder"])
    p.add_argument("--iters", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--out", help="run directory (config, metrics.jsonl, checkpoints)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--weights", help="initial weights (torchvision, reslab, safetensors, .th)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--time-limit", type=float, help="seconds of training, then a final eval")
    p.add_argument("--download", action="store_true", help="fetch CIFAR if it is missing")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    p.add_argument("--nproc", type=int, help="processes on this machine (wraps torchrun)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="with --nproc: restart the processes this often after a failure; "
                   "they resume from RUN_DIR/last.pt")  # fmt: skip
    p.set_defaults(func=cmd_train)


def cmd_data(args: argparse.Namespace) -> int:
    """`reslab data check|stats|download`: the work lives in reslab.data."""
    import logging

    from reslab.data.cifar import DataError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.data_command == "check":
            from reslab.data.check import check_data

            print(check_data(
                args.dir, quick=args.quick, labels_file=args.labels, min_size=args.min_size,
                max_pixels=args.max_pixels, num_workers=args.workers,
            ))  # fmt: skip
        elif args.data_command == "stats":
            from reslab.data.stats import (
                cifar_datasets,
                compute_cifar_stats,
                compute_folder_stats,
                save_stats,
            )  # fmt: skip

            found = cifar_datasets(args.dir)
            if found:
                name, root = found[0]
                stats = compute_cifar_stats(root, dataset=name, split=args.split)
            else:
                stats = compute_folder_stats(
                    args.dir, resize=args.resize, crop_size=args.crop_size, labels_file=args.labels,
                    max_images=args.max_images, num_workers=args.workers,
                )  # fmt: skip
            print(stats.describe())
            print(f"saved {save_stats(stats, args.out)}")
        else:
            from reslab.data.cifar import download_cifar

            print(f"{args.dataset} ready in {download_cifar(args.dir, dataset=args.dataset)}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check a data set, compute its statistics, download CIFAR")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="scan a data set without training: images per class, "
                        "unusable files and why (CIFAR directories are read as CIFAR)")  # fmt: skip
    c.add_argument("dir")
    c.add_argument("--quick", action="store_true", help="read headers only (no full decode)")
    c.add_argument("--labels", default=None, help="label file of a flat (ImageNet val) folder")
    c.add_argument("--min-size", type=int, default=224, help="report images smaller than this")
    c.add_argument("--max-pixels", type=int, default=None, help="decompression-bomb limit")
    c.add_argument("--workers", type=int, default=0)
    s = dsub.add_parser("stats", help="mean image, per-channel mean/std, RGB PCA -> a file")
    s.add_argument("dir")
    s.add_argument("--out", default="reslab-stats.pt", help="output file (default %(default)s)")
    s.add_argument("--split", default="train", choices=["train", "train45k"], help="CIFAR split")
    s.add_argument("--labels", default=None, help="label file of a flat (ImageNet val) folder")
    s.add_argument("--resize", type=int, default=256)
    s.add_argument("--crop-size", type=int, default=224)
    s.add_argument("--max-images", type=int, default=None, help="a fixed random subset")
    s.add_argument("--workers", type=int, default=0)
    d = dsub.add_parser("download", help="fetch CIFAR with torchvision's downloader")
    d.add_argument("dir")
    d.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    p.set_defaults(func=cmd_data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reslab", description="Deep residual learning (He et al., 2015): models, training, "
        "reproduction of the paper's tables and figures."
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_models, _add_data, _add_train):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
