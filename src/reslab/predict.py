"""Classify image files with a model and the preprocessing stored alongside its weights."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF

from reslab.data.images import IMAGE_EXTENSIONS, BadImageError, check_resize, load_image
from reslab.data.preprocess import Preprocess, named_preprocess
from reslab.inference import InferenceModel
from reslab.models import model_info
from reslab.models.weights import WeightsInfo
from reslab.runtime.distributed import resolve_device


class PredictError(ValueError):
    """Bad command-line input for predict (a path that does not exist, no images found)."""


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class name, probability)
    error: str | None = None  # why the image could not be classified

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "top": [{"class": c, "prob": p} for c, p in self.top]}


def collect_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given (any extension) and image files found recursively in directories, sorted.
    One path (a str or Path) is taken as one, not as a sequence of characters ("/" first)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(_images_under(p))
            if not found:
                raise PredictError(
                    f"{p} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            out += found
        elif p.is_file():
            out.append(p)
        elif os.path.lexists(p) and not os.path.exists(p):
            raise PredictError(f"{p} is a symbolic link to a file that does not exist")
        elif os.path.exists(p):  # a named pipe, socket or device: reading it may block forever
            raise PredictError(f"{p} is not a regular file (a named pipe, socket or device); "
                               "give image files or folders of them")  # fmt: skip
        else:
            raise PredictError(f"{p} does not exist")
    return out


def _images_under(root: Path) -> Iterator[Path]:
    """Image files below `root` (symlinked folders are not entered, as with Path.rglob). A
    folder that cannot be listed is refused by name: Path.rglob would leave it out silently."""

    from reslab.data.folder import unreadable_dir_message

    def refuse(e: OSError) -> None:
        raise PredictError(unreadable_dir_message(e, root))

    for dirpath, _, filenames in os.walk(root, onerror=refuse):
        for f in filenames:
            q = Path(dirpath, f)
            if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file():
                yield q


def fit_to_input(img: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, S, S]: shorter side to `resize` (or S; AlexNet's: the
    whole image to resize x resize), centre S crop.

    ImageNet nets: shorter side 256, centre 224 (the single-crop test). CIFAR nets: the
    shorter side goes straight to 32, since they only ever saw 32x32 images.
    """
    size = pre.input_size
    img = TF.resize(img, pre.test_size, antialias=True)
    return TF.center_crop(img, [size, size])


def _batches(xs: list[Path], n: int) -> Iterator[list[Path]]:
    for i in range(0, len(xs), n):
        yield xs[i : i + n]


def predict_files(
    runner: InferenceModel,
    paths: Sequence[Path],
    *,
    preprocess: dict[str, Any],
    classes: list[str] | None,
    topk: int = 5,
    batch_size: int = 64,
    max_pixels: int | None = None,
) -> list[Prediction]:
    """Top-k (class, probability) per file, in order; unreadable files get an `error` instead
    (as do images over `max_pixels`, default PIL.Image.MAX_IMAGE_PIXELS)."""
    if isinstance(paths, (str, os.PathLike)):  # one file, not its characters
        paths = [Path(paths)]
    if topk < 1 or batch_size < 1:
        raise ValueError(f"topk and batch_size must be >= 1, got {topk} and {batch_size}")
    pre = Preprocess.from_dict(preprocess)
    results: list[Prediction] = []
    for chunk in _batches(list(paths), batch_size):
        good: list[torch.Tensor] = []
        slots: list[Prediction] = []
        for p in chunk:
            pred = Prediction(str(p))
            try:
                img = load_image(p, max_pixels=max_pixels)
                if not pre.square:  # a square resize is always resize x resize
                    check_resize(p, *img.shape[-2:], pre.test_resize, max_pixels=max_pixels)
                good.append(fit_to_input(img, pre))
            except BadImageError as e:
                pred.error = e.reason
            else:
                slots.append(pred)
            results.append(pred)
        if not good:
            continue
        x = pre.normalize(torch.stack(good))  # [B, 3, S, S] float32
        probs = runner(x).softmax(dim=1)
        k = min(topk, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        for pred, vs, ix in zip(slots, values.tolist(), indices.tolist(), strict=True):
            # Outputs past the file's class names (a head wider than its data): not a class.
            names = [(classes[i] if i < len(classes) else f"(output {i})") if classes else str(i)
                     for i in ix]  # fmt: skip
            pred.top = list(zip(names, vs, strict=True))
    return results


def predict_with(
    model: torch.nn.Module, info: WeightsInfo, paths: Sequence[Path], *, normalize: str | None,
    device: str, precision: str, backend: str, topk: int, batch_size: int,
    max_pixels: int | None = None,
) -> tuple[list[Prediction], float]:  # fmt: skip
    """`reslab predict`: predict_files with the preprocessing stored with the weights (or the
    named one, for a bare state_dict), and the seconds it took, decoding included."""
    pre = info.preprocess
    if pre is None:
        if normalize is None:
            raise PredictError(
                f"{info.path} carries no preprocessing (a bare state_dict); say how its "
                "inputs were normalised with --normalize imagenet|cifar10"
            )
        pre = named_preprocess(name=normalize, input_size=model_info(info.model_name).input_size)
    runner = InferenceModel(model, device=resolve_device(device), precision=precision,
                            backend=backend, input_size=int(pre["input_size"]))  # fmt: skip
    t0 = time.perf_counter()
    preds = predict_files(runner, paths, preprocess=pre, classes=info.classes, topk=topk,
                          batch_size=batch_size, max_pixels=max_pixels)  # fmt: skip
    return preds, time.perf_counter() - t0


def write_csv(preds: Sequence[Prediction], path: str | os.PathLike, *, topk: int) -> Path:
    """One row per image: path, class_1, prob_1, ... class_k, prob_k, error. Written to a
    temporary file and renamed, so a killed run never leaves half a table."""
    import csv

    from reslab.runtime.checkpoint import check_target

    path = check_target(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    # A model with fewer classes than --topk ranks only those: no columns that are always empty.
    topk = min(topk, max((len(p.top) for p in preds), default=0) or topk)
    head = ["path"] + [f"{c}_{i}" for i in range(1, topk + 1) for c in ("class", "prob")]
    try:
        # surrogateescape: a file name that is not UTF-8 is written back as its own bytes
        with tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            w = csv.writer(f)
            w.writerow([*head, "error"])
            for p in preds:
                cells: list[Any] = [p.path]
                for i in range(topk):
                    cells += [p.top[i][0], f"{p.top[i][1]:.6f}"] if i < len(p.top) else ["", ""]
                w.writerow([*cells, p.error or ""])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
