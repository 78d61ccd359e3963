"""What `reslab eval` does: load reslab checkpoints, evaluate them (alone or as an ensemble) on a
data set with each model's stored preprocessing, print a report, write JSON and confusion PNGs."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.data.preprocess import Preprocess
from reslab.engine.evaluator import EnsembleResult, EvalResult, evaluate_ensemble

REQUIRED_KEYS = ("model_name", "model")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


@dataclass
class LoadedModel:
    name: str  # a label for reports: the file's stem
    model_name: str
    model: nn.Module
    preprocess: Preprocess
    classes: list[str]
    step: int | None


def load_checkpoint_model(path: str | Path, *, device: torch.device | str) -> LoadedModel:
    """Rebuild the model of a reslab checkpoint (model_name + model_options) and load its weights.

    Only torch.load(weights_only=True) is used: a file that needs arbitrary unpickling is refused.
    """
    from reslab.models import create_model

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, or a pickle that would need code to load
        raise CheckpointError(
            f"{path}: cannot be loaded with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); it is damaged or not a reslab "
            "checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: not a reslab checkpoint (needs {list(REQUIRED_KEYS)}, found {keys}); "
            "for other weight files use --model NAME --weights FILE"
        )
    options = dict(ckpt.get("model_options") or {})
    try:
        model = create_model(ckpt["model_name"], **options)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot rebuild {ckpt['model_name']!r}: {e}") from None
    result = model.load_state_dict(ckpt["model"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not match {ckpt['model_name']} {options}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    pre = ckpt.get("preprocess")
    if not pre:
        raise CheckpointError(f"{path}: no 'preprocess' entry; cannot normalise inputs for it")
    return LoadedModel(
        name=path.stem,
        model_name=ckpt["model_name"],
        model=model.to(device),
        preprocess=Preprocess.from_dict(pre),
        classes=list(ckpt.get("classes") or []),
        step=ckpt.get("step"),
    )


def member_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short distinct labels: the file stem, or parent/stem when stems repeat (run_a/best.pt,
    run_b/best.pt), with a counter as the last resort."""
    paths = [Path(p) for p in paths]
    labels = [p.stem for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{p.parent.name}/{p.stem}" for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{i}:{label}" for i, label in enumerate(labels, 1)]
    return labels


def _raw_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # uint8 [N, 3, H, W] on the device; each member normalises with its own preprocess.
    for i in range(0, len(labels), batch_size):
        yield images[i : i + batch_size], labels[i : i + batch_size]


def load_eval_data(
    data: str | Path, *, dataset: str, split: str, limit: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images [N, 3, H, W] and labels on `device`, plus class names."""
    if dataset not in ("cifar10", "cifar100"):
        raise ValueError(
            f"--dataset {dataset}: `reslab eval` reads cifar10/cifar100 so far; image folders "
            "come with the folder pipeline"
        )
    from reslab.data.cifar import load_cifar

    part = load_cifar(data, dataset=dataset, split=split)
    images, labels = part.images, part.labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.to(device), labels.to(device), part.classes


def run_eval(
    *,
    checkpoints: Sequence[str | Path],
    data: str | Path,
    dataset: str = "cifar10",
    split: str = "test",
    views: str = "center",
    scales: Sequence[int] | None = None,
    batch_size: int = 500,
    device: str = "auto",
    precision: str = "fp32",
    limit: int | None = None,
) -> tuple[EnsembleResult, list[LoadedModel], list[str]]:
    dev = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    )
    members = [load_checkpoint_model(p, device=dev) for p in checkpoints]
    for m, label in zip(members, member_labels(checkpoints)):
        m.name = label
    images, labels, classes = load_eval_data(
        data, dataset=dataset, split=split, limit=limit, device=dev
    )
    for m in members:
        if m.classes and m.classes != classes:
            raise CheckpointError(
                f"{m.name}: trained on classes {m.classes[:4]}... but {dataset} has "
                f"{classes[:4]}...; pass the --dataset it was trained on"
            )
        size = m.preprocess.input_size
        if images.shape[-1] != size:
            raise CheckpointError(
                f"{m.name}: expects {size}px inputs, {dataset} has {images.shape[-1]}px"
            )
    result = evaluate_ensemble(
        [m.model for m in members],
        _raw_batches(images, labels, batch_size),
        device=dev,
        precision=precision,
        num_classes=len(classes),
        views=views,
        scales=scales,
        normalizers=[m.preprocess.normalize for m in members],
        names=[m.name for m in members],
    )
    return result, members, classes


def format_report(result: EnsembleResult, classes: Sequence[str]) -> str:
    """Members and the ensemble side by side, then the per-class accuracy of the final model."""
    from reslab.analysis.tables import markdown_table

    rows: list[EvalResult] = list(result.members)
    if len(rows) > 1:
        rows.append(result.ensemble)
    table = markdown_table(
        ["model", "top-1 err %", "top-5 err %", "loss", "images"],
        [
            [
                r.name,
                f"{r.top1_error:.2f}",
                f"{r.top5_error:.2f}",
                f"{r.loss:.4f}",
                str(r.num_samples),
            ]
            for r in rows
        ],
    )
    final = result.ensemble
    acc = final.per_class_accuracy.tolist()
    per_class = markdown_table(
        ["class", f"accuracy % ({final.name})"],
        [[c, "-" if a != a else f"{a:.2f}"] for c, a in zip(classes, acc)],
    )
    return f"{table}\n\n{per_class}"


def write_outputs(
    result: EnsembleResult,
    classes: Sequence[str],
    *,
    out_dir: Path,
    json_path: Path | None,
    meta: dict[str, Any],
) -> list[Path]:
    """confusion-matrix PNG per member (and the ensemble) in out_dir, and the JSON report."""
    from reslab.analysis.plots import plot_confusion

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    finals = list(result.members) + ([result.ensemble] if len(result.members) > 1 else [])
    for r in finals:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in r.name)
        png = out_dir / f"confusion-{safe}.png"
        plot_confusion(
            r.confusion,
            classes=classes,
            out=png,
            title=f"{r.name}: top-1 error {r.top1_error:.2f}%",
        )
        written.append(png)
    doc = {
        **meta,
        "members": [r.to_dict(classes) for r in result.members],
        "ensemble": result.ensemble.to_dict(classes) if len(result.members) > 1 else None,
    }
    json_path = json_path or out_dir / "eval.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1))
    written.append(json_path)
    return written
