"""What `reslab eval` does: load reslab checkpoints, evaluate them (alone or as an ensemble) on a
data set with each model's stored preprocessing, print a report, write JSON and confusion PNGs."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.data import check_data_root, resolve_data_root
from reslab.data.preprocess import Preprocess
from reslab.engine.evaluator import EnsembleResult, EvalResult, evaluate_ensemble
from reslab.runtime.checkpoint import CheckpointError, load_checkpoint
from reslab.runtime.distributed import resolve_device
from reslab.runtime.memory import tune_malloc
from reslab.runtime.precision import resolve_precision

REQUIRED_KEYS = ("model_name", "model")


@dataclass
class LoadedModel:
    name: str  # a label for reports: the file's stem
    model_name: str
    model: nn.Module
    preprocess: Preprocess
    classes: list[str]
    step: int | None
    # What the run that wrote a checkpoint trained on (its config's dataset and val_split);
    # empty for weights files. eval takes its default --dataset from it.
    trained_on: dict[str, Any] = field(default_factory=dict)
    # Whether --normalize chose the preprocessing (a weights file that carries none); False when
    # the file said it, and a --normalize given anyway was not used (eval says so).
    normalize_used: bool = False


def load_checkpoint_model(path: str | Path, *, device: torch.device | str) -> LoadedModel:
    """Rebuild the model of a reslab checkpoint (model_name + model_options) and load its weights.

    Read by runtime.checkpoint.load_checkpoint: a file that needs code to unpickle is refused.
    """
    from reslab.models import create_model

    path = Path(path)
    ckpt = load_checkpoint(path)
    if any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError(
            f"{path}: not a model checkpoint (needs {list(REQUIRED_KEYS)}, found "
            f"{sorted(ckpt)[:8]}); for other weight files use --model NAME --weights FILE"
        )
    from reslab.models.weight_formats import check_classes_fit, check_meta

    # The same checks of what the file says as every other weights reader (types, ranges).
    check_meta({k: ckpt.get(k) for k in ("model_name", "classes", "preprocess")}
                | {"model_options": ckpt.get("model_options") or {}}, path)  # fmt: skip
    options = dict(ckpt.get("model_options") or {})
    try:
        model = create_model(ckpt["model_name"], **options)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot rebuild {ckpt['model_name']!r}: {e}") from None
    try:
        result = model.load_state_dict(ckpt["model"], strict=False)
    except (RuntimeError, TypeError, AttributeError) as e:  # shapes of another architecture
        raise CheckpointError(f"{path}: its weights do not fit {ckpt['model_name']} {options} "
                              f"({str(e).splitlines()[-1].strip()[:120]})") from None  # fmt: skip
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not match {ckpt['model_name']} {options}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    check_classes_fit(ckpt.get("classes"), model, path)
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
        trained_on={
            k: v for k, v in (ckpt.get("config") or {}).items() if k in ("dataset", "val_split")
        },
    )


def eval_folder(data: str | Path, classes: Sequence[str]) -> Path:
    """The folder `reslab eval --data DIR` scores: DIR/val where DIR is a training layout with a
    validation set (train/ + val/, or class folders beside val/, as training reads it) and the
    model has no class named val; else DIR itself."""
    root = Path(data)
    return root / "val" if (root / "val").is_dir() and "val" not in classes else root


def default_dataset(members: Sequence[LoadedModel]) -> str:
    """The data set a checkpoint's run trained on (an image folder, CIFAR-100), else CIFAR-10:
    `reslab eval --checkpoint RUN/best.pt --data DIR` of a fine-tuned run reads DIR as a folder."""
    ds = members[0].trained_on.get("dataset") if members else None
    return ds if ds in ("cifar10", "cifar100", "folder") else "cifar10"


def fast_eval_model(
    model: nn.Module, device: torch.device, precision: str | None = None
) -> nn.Module:
    """The eval-mode model `reslab eval` runs: BatchNorm folded into the convolutions and
    channels_last on the CPU (reslab.inference's path; the same numbers to fp32 rounding), its
    weights stored in bf16 once where the CPU evaluates in bf16 (`precision`; the same logits
    to the bit as autocast casting them per call). ResNet-20 forward on 2 Zen 4 cores: folding
    1.1-1.4x, channels_last 1.2x (bf16) and 1.6x (fp32) faster."""
    from reslab import inference

    model = inference.fold_batchnorm(model)
    if device.type != "cpu":
        return model
    model = model.to(device, memory_format=torch.channels_last)
    if inference.PRECAST and precision == "bf16":
        inference.precast(model, torch.bfloat16)
    return model


def member_labels(paths: Sequence[str | Path], archs: Sequence[str]) -> list[str]:
    """Labels by architecture, with the file to tell members apart: "resnet56 (best)", or
    "resnet20 (run_a/best)" when stems repeat, with a counter as the last resort."""
    paths = [Path(p) for p in paths]
    labels = [f"{a} ({p.stem})" for a, p in zip(archs, paths, strict=True)]
    if len(set(labels)) < len(labels):
        labels = [f"{a} ({p.parent.name}/{p.stem})" for a, p in zip(archs, paths, strict=True)]
    if len(set(labels)) < len(labels):
        labels = [f"{i}:{label}" for i, label in enumerate(labels, 1)]
    return labels


def load_weights_model(
    path: str | Path, *, model_name: str | None, device: torch.device | str,
    normalize: str | None = None,
) -> LoadedModel:  # fmt: skip
    """--model NAME --weights FILE: any format reslab.models.weights reads (torchvision,
    pytorch_resnet_cifar10, safetensors, reslab), with the preprocessing the file implies, or
    for a file that carries none, the named one (`normalize`: "imagenet" or "cifar10")."""
    from reslab.data.preprocess import named_preprocess
    from reslab.models.registry import model_info
    from reslab.models.weights import model_from_weights

    model, info = model_from_weights(path, model_name=model_name)
    pre = info.preprocess
    if not pre:
        if normalize is None:
            raise CheckpointError(
                f"{path}: the file does not say how its inputs were normalised; say it with "
                "--normalize imagenet|cifar10"
            )
        pre = named_preprocess(name=normalize, input_size=model_info(info.model_name).input_size)
    return LoadedModel(
        name=f"{info.model_name} ({Path(path).stem})",
        model_name=str(info.model_name),
        model=model.to(device),
        preprocess=Preprocess.from_dict(pre),
        classes=list(info.classes or []),
        step=info.extra.get("step"),
        normalize_used=not info.preprocess,
    )


def normalizer(pre: Preprocess) -> Callable[[torch.Tensor], torch.Tensor]:
    """pre.normalize, made to accept any input size: a per-pixel mean image only fits inputs of
    its own size, so other sizes (the multi-scale test) subtract its per-channel average."""
    channel = Preprocess(kind=pre.kind, input_size=pre.input_size, resize=pre.resize,
                         mode="per_channel", mean=pre.mean.mean((-2, -1)).flatten(),
                         std=pre.std.flatten())  # fmt: skip

    def norm(x: torch.Tensor) -> torch.Tensor:
        if pre.mode == "per_pixel" and tuple(x.shape[-2:]) != tuple(pre.mean.shape[-2:]):
            # NOTE(paper): the paper does not say which mean the fully-convolutional
            # multi-scale test subtracts; the mean image's channel means is our choice.
            return channel.normalize(x)
        return pre.normalize(x)

    return norm


def _raw_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # uint8 [N, 3, H, W] on the device; each member normalises with its own preprocess.
    for i in range(0, len(labels), batch_size):
        yield images[i : i + batch_size], labels[i : i + batch_size]


def cifar_batches(
    data: str | Path, *, dataset: str, split: str, limit: int | None, batch_size: int,
    device: torch.device,
) -> tuple[Iterable[tuple[torch.Tensor, torch.Tensor]], list[str], int]:  # fmt: skip
    """The whole split as one uint8 tensor on `device`, sliced into raw batches."""
    from reslab.data.cifar import load_cifar

    part = load_cifar(data, dataset=dataset, split=split)
    images, labels = part.images[:limit], part.labels[:limit]
    batches = _raw_batches(images.to(device), labels.to(device), batch_size)
    return batches, part.classes, images.shape[-1]


def folder_batches(
    data: str | Path, *, pre: Preprocess, views: str, scales: Sequence[int] | None,
    labels_file: str | Path | None, classes: Sequence[str] | None, limit: int | None,
    batch_size: int, workers: int, pin_memory: bool = False, max_pixels: int | None = None,
) -> tuple[Iterable, list[str]]:  # fmt: skip
    """An image folder through the data pipeline's evaluation transforms (uint8, in workers):
    centre crop [B, 3, S, S] (also for flip and flip-shift), ten-crop [B, 10, 3, S, S], or the
    multi-scale views of one image at a time (its aspect ratio kept: a list of [1, 2, 3, h, w], image and flip, per scale)."""
    from torch.utils.data import DataLoader, Subset

    from reslab.data import transforms as T
    from reslab.data.folder import ImageFolder

    resize, crop = pre.test_resize, pre.input_size
    if views in ("center", "flip", "flip-shift"):  # the evaluator makes these from the crop
        tf = T.center_crop_transform(resize=resize, crop_size=crop, square=pre.square)
    elif views == "ten-crop":
        # Corners need an image larger than the crop: at least section 3.4's 256-for-224.
        resize = max(resize, round(crop * 256 / 224))
        tf = T.ten_crop_transform(resize=resize, crop_size=crop, square=pre.square)
    else:
        from reslab.engine.views import default_scales

        sides = tuple(scales or default_scales(pre.input_size))
        tf = functools.partial(T.multiscale_views, shorter_sides=sides)
        batch_size = 1  # every image has its own aspect ratio at every scale
        resize = max(sides)
    ds = ImageFolder(data, transform=tf, labels_file=labels_file, classes=classes,
                     unknown="refuse", max_pixels=max_pixels,
                     resize=None if pre.square and views != "multi-scale" else resize)  # fmt: skip
    part = Subset(ds, range(min(limit, len(ds)))) if limit is not None else ds
    # pin_memory (for a CUDA device): the evaluator's non_blocking copies are asynchronous only
    # from pinned memory; from pageable memory each one blocks the host.
    loader = DataLoader(part, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory)
    return loader, list(ds.classes)


def run_eval(
    *,
    checkpoints: Sequence[str | Path] = (),
    weights: str | Path | None = None,
    model_name: str | None = None,
    data: str | Path | None = None,
    dataset: str | None = None,
    split: str = "test",
    views: str = "center",
    scales: Sequence[int] | None = None,
    labels_file: str | Path | None = None,
    batch_size: int | None = None,
    workers: int = 2,
    device: str = "auto",
    precision: str = "fp32",
    limit: int | None = None,
    max_pixels: int | None = None,
    normalize: str | None = None,
) -> tuple[EnsembleResult, list[LoadedModel], list[str]]:
    """Evaluate reslab checkpoints (several = an ensemble) or one --weights file.

    batch_size: images per batch (each then gives 10 crops with ten-crop); default 500 for CIFAR,
    32 for folders. dataset: None takes the first checkpoint's own (`default_dataset`).
    """
    check_data_root(data)
    data = resolve_data_root(data)
    dev = resolve_device(device)
    tune_malloc()  # an image folder's batches reuse the heap (reslab.runtime.memory)
    precision = resolve_precision(precision, dev)
    if bool(checkpoints) == (weights is not None):
        raise ValueError("give either --checkpoint FILE [FILE ...] or --model NAME --weights FILE")
    if checkpoints:
        members = [load_checkpoint_model(p, device=dev) for p in checkpoints]
        for m, label in zip(members, member_labels(checkpoints, [m.model_name for m in members])):
            m.name = label
    else:
        members = [load_weights_model(weights, model_name=model_name, device=dev,
                                      normalize=normalize)]  # fmt: skip
    dataset = dataset or default_dataset(members)
    batch_size = batch_size or (32 if dataset == "folder" else 500)
    if dataset == "folder":
        data = eval_folder(data, members[0].classes)
        first = members[0].preprocess
        for m in members[1:]:
            geo = (m.preprocess.input_size, m.preprocess.resize, m.preprocess.square)
            if geo != (first.input_size, first.resize, first.square):
                raise CheckpointError(f"{m.name}: its input size/resize (or AlexNet's square "
                                      f"resize) differ from {members[0].name}'s; folder "
                                      "ensembles share one crop")  # fmt: skip
        batches, classes = folder_batches(
            data, pre=first, views=views, scales=scales, labels_file=labels_file,
            classes=members[0].classes or None, limit=limit, batch_size=batch_size,
            workers=workers, pin_memory=dev.type == "cuda", max_pixels=max_pixels,
        )  # fmt: skip
        side = first.input_size
    else:
        batches, classes, side = cifar_batches(data, dataset=dataset, split=split, limit=limit,
                                               batch_size=batch_size, device=dev)  # fmt: skip
    for m in members:
        if m.classes and m.classes != classes:
            raise CheckpointError(
                f"{m.name}: trained on classes {m.classes[:4]}... but the data has "
                f"{classes[:4]}...; evaluate it on the data set it was trained on"
            )
        if m.preprocess.input_size != side:
            raise CheckpointError(
                f"{m.name}: expects {m.preprocess.input_size}px inputs, {dataset} has {side}px"
            )
    result = evaluate_ensemble(
        [fast_eval_model(m.model, dev, precision) for m in members],
        batches,
        device=dev,
        precision=precision,
        num_classes=len(classes),
        views=views,
        scales=scales,
        normalizers=[normalizer(m.preprocess) for m in members],
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
        # "resnet20 (run2/best)" -> confusion-resnet20_run2_best.png
        safe = re.sub(r"[^A-Za-z0-9.-]+", "_", r.name).strip("_")
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
    from reslab.runtime.checkpoint import write_text_atomic

    write_text_atomic(json_path, json.dumps(doc, indent=1))  # a kill keeps the previous report
    written.append(json_path)
    return written
