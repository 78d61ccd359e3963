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


def _add_model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="FILE", help="a reslab checkpoint or safetensors file")
    src.add_argument(
        "--weights", metavar="FILE", help="weights in any supported format (torchvision, "
        "pytorch_resnet_cifar10 .th, safetensors, DataParallel state_dict, reslab)",
    )  # fmt: skip
    p.add_argument("--model", metavar="NAME", help="architecture for --weights (default: detected)")


def _load_model_source(args: argparse.Namespace):
    from reslab.models.weights import model_from_weights

    if args.checkpoint is not None:
        if args.model is not None:
            raise ValueError("--model goes with --weights; a --checkpoint names its own model")
        return model_from_weights(args.checkpoint)
    return model_from_weights(args.weights, model_name=args.model)


def _fail(cmd: str, err: BaseException) -> int:
    print(f"reslab {cmd}: error: {err}", file=sys.stderr)
    return 2


def cmd_export(args: argparse.Namespace) -> int:
    """Write the model as ONNX or TorchScript with its preprocessing and classes inside."""
    from reslab.export import export_model
    from reslab.models import model_info

    try:
        model, info = _load_model_source(args)
        pre = info.preprocess or {}
        size = pre.get("input_size") or model_info(info.model_name).input_size
        out = export_model(
            model, args.out, format=args.format, input_size=size, model_name=info.model_name,
            model_options=info.model_options, preprocess=info.preprocess, classes=info.classes,
        )  # fmt: skip
    except (ValueError, KeyError, FileNotFoundError) as e:
        return _fail("export", e)
    print(f"wrote {out} ({args.format}, {info.model_name}, input [N, 3, {size}, {size}])")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ONNX or TorchScript (dynamic batch)")
    _add_model_source(p)
    p.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    p.add_argument("--out", required=True, metavar="FILE")
    p.set_defaults(func=cmd_export)


def cmd_predict(args: argparse.Namespace) -> int:
    """Top-k classes per image, using the preprocessing stored with the weights."""
    import json

    import torch

    from reslab.inference import InferenceModel
    from reslab.models import model_info
    from reslab.predict import PredictError, collect_images, predict_files

    try:
        paths = collect_images(args.inputs)
        model, info = _load_model_source(args)
        pre = info.preprocess
        if pre is None:
            if args.normalize is None:
                raise ValueError(
                    f"{info.path} carries no preprocessing (a bare state_dict); say how its "
                    "inputs were normalised with --normalize imagenet|cifar10"
                )
            pre = _named_preprocess(args.normalize, model_info(info.model_name).input_size)
        runner = InferenceModel(model, device=torch.device(args.device), precision=args.precision)
        preds = predict_files(
            runner, paths, preprocess=pre, classes=info.classes, topk=args.topk,
            batch_size=args.batch_size,
        )  # fmt: skip
    except (ValueError, KeyError, FileNotFoundError, PredictError) as e:
        return _fail("predict", e)
    if args.json:
        print(json.dumps([p.to_dict() for p in preds], indent=1))
    else:
        for p in preds:
            if p.error is not None:
                print(f"{p.path}: ERROR {p.error}")
            else:
                print(f"{p.path}: " + ", ".join(f"{c} {v:.1%}" for c, v in p.top))
    bad = sum(p.error is not None for p in preds)
    if bad:
        print(f"{bad} of {len(preds)} images could not be read", file=sys.stderr)
    return 1 if bad else 0


def _named_preprocess(name: str, size: int) -> dict:
    from reslab.data.preprocess import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD

    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if name == "imagenet" else (CIFAR10_MEAN, CIFAR10_STD)
    return {"kind": "imagenet" if size > 32 else "cifar", "input_size": size,
            "resize": 256 if size == 224 else None, "mode": "per_channel",
            "mean": list(mean), "std": list(std)}  # fmt: skip


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images (files or directories)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|DIR")
    _add_model_source(p)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware has native bf16")  # fmt: skip
    p.add_argument("--normalize", choices=["imagenet", "cifar10"], default=None,
                   help="only for weights that carry no preprocessing")  # fmt: skip
    p.set_defaults(func=cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reslab", description="Deep residual learning (He et al., 2015): models, training, "
        "reproduction of the paper's tables and figures."
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_models, _add_export, _add_predict):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
