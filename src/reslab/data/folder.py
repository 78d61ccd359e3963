"""Image folders as data sets: the ImageNet train layout (one subfolder per class) and ImageNet's
val layout (one flat folder plus a label file).

Bad input never kills training. An up-front scan (a cheap header read per file, or a full
decode with check="decode") drops unusable files with a one-line warning each and a summary;
a file that still fails inside a DataLoader worker is replaced by the next decodable sample
(deterministic: it depends only on the index and the files), recorded in shared memory and
reported by `ImageFolder.skipped()`.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from reslab.data.cifar import DataError
from reslab.data.images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    check_resize,
    default_max_pixels,
    describe_mode,
    load_image,
    read_header,
)

__all__ = [
    "BadFile",
    "DataError",
    "ImageFolder",
    "ScanReport",
    "check_listable",
    "list_samples",
    "read_label_file",
    "scan_folder",
]

log = logging.getLogger("reslab.data")
Check = Literal["none", "header", "decode"]
_MAX_WARN_LINES = 20


@dataclass(frozen=True)
class BadFile:
    path: str
    reason: str


@dataclass
class ScanReport:
    """What a scan found. `samples` are the usable (path, class index) pairs."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]] = field(default_factory=list)
    bad: list[BadFile] = field(default_factory=list)
    converted: Counter = field(default_factory=Counter)  # conversion -> number of files
    small: list[str] = field(default_factory=list)  # shorter side < min_size: upscaled
    empty_classes: list[str] = field(default_factory=list)
    ignored: int = 0  # files without an image extension (not counted as bad)
    min_size: int = 0
    check: str = "header"

    def per_class(self) -> list[int]:
        counts = Counter(label for _, label in self.samples)
        return [counts.get(i, 0) for i in range(len(self.classes))]

    def summary(self) -> str:
        """One line."""
        parts = [f"{len(self.samples)} usable images in {len(self.classes)} classes"]
        if self.bad:
            why = Counter(b.reason.split(":")[0].split(" (")[0] for b in self.bad)
            parts.append(
                f"{len(self.bad)} skipped ("
                + ", ".join(f"{n} {r}" for r, n in why.most_common())
                + ")"
            )
        if self.converted:
            parts.append(f"{sum(self.converted.values())} converted to RGB")
        if self.small:
            parts.append(
                f"{len(self.small)} smaller than {self.min_size}px (upscaled by the resize)"
            )
        if self.empty_classes:
            parts.append(f"{len(self.empty_classes)} empty classes")
        if self.ignored:
            parts.append(f"{self.ignored} non-image files ignored")
        return f"{self.root}: " + "; ".join(parts)

    def format(self, *, max_list: int = 50) -> str:
        """Multi-line report: images per class, unusable files and why, conversions."""
        lines = [f"{self.root} (check={self.check})", "images per class:"]
        for name, n in zip(self.classes, self.per_class()):
            lines.append(f"  {name:<32} {n:>8}" + ("   EMPTY" if n == 0 else ""))
        if self.bad:
            lines.append(f"unusable files ({len(self.bad)}):")
            lines += [f"  {b.path}: {b.reason}" for b in self.bad[:max_list]]
            if len(self.bad) > max_list:
                lines.append(f"  ... and {len(self.bad) - max_list} more")
        if self.converted:
            lines.append("converted on load:")
            lines += [f"  {n:>8}  {what}" for what, n in self.converted.most_common()]
        if self.small:
            lines.append(
                f"smaller than {self.min_size}px on the shorter side (upscaled): {len(self.small)}"
            )
            lines += [f"  {p}" for p in self.small[:max_list]]
            if len(self.small) > max_list:
                lines.append(f"  ... and {len(self.small) - max_list} more")
        lines.append("summary: " + self.summary())
        return "\n".join(lines)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _require_dir(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data directory {root} does not exist (check the path)")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory (give the folder holding the images)")


def unreadable_dir_message(e: OSError, path: object) -> str:
    """What to say about a folder that cannot be listed (`e` from os.scandir / os.walk)."""
    where = e.filename if e.filename is not None else path
    if isinstance(e, PermissionError):
        return f"permission denied: {where}; fix its permissions (chmod) or remove it"
    return f"cannot read the folder {where}: {e.strerror or e}"


def _unreadable_dir(e: OSError, path: object) -> DataError:
    """A folder of the data set that cannot be listed. Never skipped: a class folder read as
    empty would train as a class without samples, and a sub-folder left out shrinks a class,
    with nothing but a count to show for it."""
    return DataError(unreadable_dir_message(e, path))


def check_listable(path: str | Path) -> None:
    """Refuse a data folder that exists but cannot be listed, naming it: Path.is_dir() on
    what lies inside raises a bare PermissionError that names a child (DIR/train) instead."""
    if os.path.isdir(path):
        _scandir(path)


def _scandir(path: str | Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError as e:
        raise _unreadable_dir(e, path) from None


def read_label_file(
    path: str | Path, *, classes: Sequence[str] | None = None
) -> tuple[dict[str, int], list[str]]:
    """Labels of a flat (ImageNet val) folder -> ({file name or stem: class index}, classes).

    Formats: lines `name label` or `name,label` (label a class name such as a WordNet id, or an
    integer index), or Kaggle's LOC_val_solution.csv (`ImageId,PredictionString`, the class is
    the first word of the prediction string). A first line naming columns is skipped. Pass the
    training folder's `classes` so that indices agree with the model's.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"label file {path} does not exist (give --labels PATH: lines 'file label')"
        )
    rows: list[tuple[str, str]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"label file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        "save it as UTF-8") from None  # fmt: skip
    kaggle = bool(lines) and lines[0].replace(" ", "").lower().startswith(
        "imageid,predictionstring"
    )
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        parts = line.split(",", 1) if "," in line else line.split(None, 1)
        if len(parts) != 2 or not parts[1].strip():
            raise DataError(f"{path}:{i + 1}: expected 'file label', got {line!r}")
        name, label = parts[0].strip(), parts[1].strip()
        if kaggle:
            label = label.split()[0]
        if i == 0 and (kaggle or label.lower() in {"label", "class", "wnid", "predictionstring"}):
            continue
        rows.append((name, label))
    if not rows:
        raise DataError(f"label file {path} has no labels")
    numeric = all(lab.lstrip("-").isdigit() for _, lab in rows)
    if numeric and classes is None:
        from reslab.models.registry import MAX_CLASSES

        # Numeric labels name classes 0..max: one stray huge label must not build a list of a
        # billion class names (memory) before anything checks it.
        top = max(rows, key=lambda r: int(r[1]))
        if int(top[1]) >= MAX_CLASSES:
            raise DataError(f"{path}: label {top[1]} for {top[0]} is beyond {MAX_CLASSES - 1}, "
                            "the most classes reslab builds; fix that line")  # fmt: skip
    if classes is None:
        classes = (
            [str(i) for i in range(max(int(lab) for _, lab in rows) + 1)]
            if numeric
            else sorted({lab for _, lab in rows})
        )
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, int] = {}
    for name, lab in rows:
        if numeric and lab not in index:
            k = int(lab)
            if not 0 <= k < len(classes):
                raise DataError(f"{path}: label {k} for {name} is outside 0..{len(classes) - 1}")
        elif lab not in index:
            raise DataError(
                f"{path}: class {lab!r} for {name} is not one of the {len(classes)} known classes"
            )
        else:
            k = index[lab]
        out[name] = k
    return out, list(classes)


def list_samples(
    root: str | Path,
    *,
    labels_file: str | Path | None = None,
    classes: Sequence[str] | None = None,
    unknown: Literal["ignore", "refuse"] = "ignore",
) -> tuple[list[str], list[tuple[str, int]], list[str], list[BadFile], int]:
    """Walk a folder (no decoding) -> (classes, [(path, label)], empty classes, unlabelled, ignored).

    Without `labels_file`: one subfolder per class (nested folders inside a class are walked),
    classes sorted by name unless given. With it: the images directly in `root`, labelled by it.
    unknown="refuse": with `classes` given, a subfolder that is not one of them is an error (an
    evaluation or validation set would otherwise leave its images out without a word).
    """
    root = Path(root)
    _require_dir(root)
    samples: list[tuple[str, int]] = []
    unlabelled: list[BadFile] = []
    ignored = 0
    if labels_file is not None:
        labels, classes = read_label_file(labels_file, classes=classes)
        for entry in sorted(_scandir(root), key=lambda e: e.name):
            if not entry.is_file():
                continue
            if not _is_image(entry.name):
                ignored += 1
                continue
            k = labels.get(entry.name, labels.get(os.path.splitext(entry.name)[0]))
            if k is None:
                unlabelled.append(BadFile(entry.path, f"no label in {labels_file}"))
            else:
                samples.append((entry.path, k))
        return list(classes), samples, [], unlabelled, ignored
    found = sorted(e.name for e in _scandir(root) if e.is_dir() and not e.name.startswith("."))
    if classes is None:
        classes = found
    extra = [f for f in found if f not in classes]
    if extra and unknown == "refuse":
        raise DataError(
            f"{root} has class folders that are not among the {len(classes)} known classes: "
            f"{', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}; their images would be "
            f"left out. Rename them to known ones ({', '.join(list(classes)[:8])}"
            f"{', ...' if len(classes) > 8 else ''}) or move them out"
        )
    missing = [c for c in classes if c not in found]
    if not classes:
        raise DataError(
            f"{root} has no class subfolders; expected {root}/<class>/<image> "
            "(or a flat folder with --labels FILE)"
        )
    empty = list(missing)
    for k, name in enumerate(classes):
        if name in missing:
            continue
        n0 = len(samples)
        seen: set[tuple[int, int]] = set()  # (device, inode) of each real directory walked
        # os.walk skips a folder it cannot list without a word (its default onerror).
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True,
                                                    onerror=_raise_unreadable):  # fmt: skip
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                # A symlink back into the tree (a loop) or a second link to one directory: its
                # images are already listed once; walking it again would count them again.
                log.warning("not following %s: it leads to a directory already read", dirpath)
                dirnames.clear()
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames.sort()
            for f in sorted(filenames):
                if _is_image(f):
                    samples.append((os.path.join(dirpath, f), k))
                else:
                    ignored += 1
        if len(samples) == n0:
            empty.append(name)
    return list(classes), samples, empty, unlabelled, ignored


def _raise_unreadable(e: OSError) -> None:
    raise _unreadable_dir(e, e.filename)


def _inspect(
    path: str, check: str, max_pixels: int | None, min_size: int = 0
) -> tuple[str | None, str | None, int]:
    """-> (bad reason or None, conversion or None, shorter side). An image that the upscale to
    `min_size` would blow up past max_pixels (a thin strip) is bad before anything is decoded."""
    try:
        head = read_header(path, max_pixels=max_pixels)
        if min_size:
            check_resize(path, head.height, head.width, min_size, max_pixels=max_pixels)
        if check == "decode":
            img = load_image(path, max_pixels=max_pixels)
            return None, describe_mode(head.mode), min(img.shape[-2:])
        return None, describe_mode(head.mode), min(head.width, head.height)
    except BadImageError as e:
        return e.reason, None, 0


class _ScanSet(Dataset):
    def __init__(self, paths: list[str], check: str, max_pixels: int | None, min_size: int) -> None:
        self.paths, self.check, self.max_pixels, self.min_size = paths, check, max_pixels, min_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str | None, str | None, int]:
        return _inspect(self.paths[i], self.check, self.max_pixels, self.min_size)


def _warn_each(bad: Sequence[BadFile]) -> None:
    for b in bad[:_MAX_WARN_LINES]:
        log.warning("skipping %s: %s", b.path, b.reason)
    if len(bad) > _MAX_WARN_LINES:
        log.warning(
            "... and %d more unusable files (see the summary / reslab data check)",
            len(bad) - _MAX_WARN_LINES,
        )


def folder_layout(root: str | Path) -> tuple[Path, Path | None, list[str] | None]:
    """How training reads an image folder -> (training dir, validation dir or None, training
    class names, None for every subfolder). DIR/train + DIR/val, or DIR/CLASS/* beside
    DIR/val/CLASS/* (val/ is then the validation set, never a class), or DIR/CLASS/* alone.
    `data check` and `data stats` read the same layout, so they count what training sees."""
    root = Path(root)
    check_listable(root)
    train_dir = root / "train" if (root / "train").is_dir() else root
    val_dir = root / "val" if (root / "val").is_dir() else None
    classes = None
    if train_dir == root and val_dir is not None:
        classes = sorted(e.name for e in _scandir(root)
                         if e.is_dir() and not e.name.startswith(".") and e.name != "val")  # fmt: skip
    return train_dir, val_dir, classes


def scan_folder(
    root: str | Path,
    *,
    labels_file: str | Path | None = None,
    classes: Sequence[str] | None = None,
    check: Check = "header",
    min_size: int = 0,
    max_pixels: int | None = None,
    num_workers: int = 0,
    warn: bool = True,
    unknown: Literal["ignore", "refuse"] = "ignore",
) -> ScanReport:
    """List and check every image file of a folder data set.

    check: "header" reads each header (zero-byte, non-image, bomb; fast), "decode" decodes every
    image as training would (also finds corrupt and truncated data), "none" only lists files.
    Raises `DataError` for a missing directory or one without a usable image.
    """
    if check not in ("none", "header", "decode"):
        raise ValueError(f"check must be 'none', 'header' or 'decode', got {check!r}")
    classes_, listed, empty, unlabelled, ignored = list_samples(
        root, labels_file=labels_file, classes=classes, unknown=unknown
    )
    report = ScanReport(
        str(root), classes_, empty_classes=empty, ignored=ignored, min_size=min_size, check=check
    )
    report.bad.extend(unlabelled)
    if check == "none":
        report.samples = listed
    else:
        paths = [p for p, _ in listed]
        if num_workers > 0 and len(paths) > 256:
            loader = DataLoader(
                _ScanSet(paths, check, max_pixels, min_size),
                batch_size=None,
                num_workers=num_workers,
            )
            results = list(loader)
        else:
            results = [_inspect(p, check, max_pixels, min_size) for p in paths]
        for (path, label), (reason, conv, short) in zip(listed, results):
            if reason is not None:
                report.bad.append(BadFile(path, reason))
                continue
            report.samples.append((path, label))
            if conv:
                report.converted[conv] += 1
            if short < min_size:
                report.small.append(path)
        counts = report.per_class()
        report.empty_classes = [c for c, n in zip(classes_, counts) if n == 0]
    if warn:
        _warn_each(report.bad)
        for c in report.empty_classes:
            where = f"class {c} in {root}" if labels_file else f"class folder {Path(root) / c}"
            log.warning("%s has no usable image (the class is kept, with no samples)", where)
        if report.small:
            log.warning(
                "%d images are smaller than %dpx and will be upscaled by the resize",
                len(report.small),
                min_size,
            )
        if report.bad or report.empty_classes:
            log.warning("%s", report.summary())
    if not report.samples:
        raise DataError(
            f"{root} has no usable image ({len(report.bad)} unusable, {ignored} without an image "
            f"extension); expected {Path(root)}/<class>/<image>.jpg"
            + (" or a labelled flat folder" if labels_file is None else "")
        )
    return report


_SKIP_CODES = {
    1: "zero-byte file",
    2: "not an image",
    3: "corrupt or truncated",
    4: "decompression bomb",
    5: "unreadable",
    6: "permission denied",
    7: "extreme aspect ratio",
}


def _code(reason: str) -> int:
    for code, text in _SKIP_CODES.items():
        if reason.split()[0] == text.split()[0]:
            return code
    return 5


class ImageFolder(Dataset):
    """A folder data set yielding (transform(uint8 [3, H, W]), class index).

    `transform` runs on the decoded uint8 tensor in the DataLoader worker (e.g.
    `reslab.data.transforms.imagenet_train_transform()`). Images whose shorter side is below
    `min_size` are upscaled to it first (so no crop fails), and reported. `resize`: the shorter
    side `transform` resizes whole images to (a test-time transform; None for one that crops
    first). An image that either resize would make larger than `max_pixels` (a thin strip:
    images.check_resize) is skipped like an undecodable one, before any pixel is resized.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
        labels_file: str | Path | None = None,
        classes: Sequence[str] | None = None,
        check: Check = "header",
        min_size: int = 0,
        max_pixels: int | None = None,
        num_workers: int = 0,
        unknown: Literal["ignore", "refuse"] = "ignore",
        on_bad: Literal["replace", "drop"] = "replace",
        resize: int | None = None,
    ) -> None:
        self.root, self.transform, self.on_bad = str(root), transform, on_bad
        self.resize = resize
        # Fixed here, in the process that builds the set: DataLoader workers started by spawn
        # (macOS, Windows) import PIL afresh and would not see a limit raised in this one.
        if max_pixels is None:
            max_pixels = default_max_pixels()
        self.min_size, self.max_pixels = min_size, max_pixels
        self.report = scan_folder(
            root, labels_file=labels_file, classes=classes, check=check, min_size=min_size,
            max_pixels=max_pixels, num_workers=num_workers, unknown=unknown,
        )  # fmt: skip
        self.classes = self.report.classes
        self.samples = self.report.samples
        self.targets = [k for _, k in self.samples]
        # Workers read paths and labels from two numpy buffers, not the list of Python objects:
        # touching millions of refcounts would copy the parent's pages into every worker.
        self._paths = np.array([os.fsencode(p) for p, _ in self.samples])
        self._labels = np.array(self.targets, dtype=np.int64)
        # One byte per sample in shared memory: workers mark files that fail late (0 = fine).
        self._skip = torch.zeros(len(self.samples), dtype=torch.int8).share_memory_()
        self._index: np.ndarray | None = None  # select(): this view's samples, in order

    def select(self, indices: Sequence[int]) -> ImageFolder:
        """A view of these samples (a split) sharing the skip marks. Unlike a torch Subset, a
        file that fails to decode is replaced by the next usable sample OF THE VIEW, so a
        validation image can never stand in for a training one, nor the other way round."""
        view = copy.copy(self)
        idx = np.asarray(indices, dtype=np.int64)
        view._index = idx if self._index is None else self._index[idx]
        return view

    def __len__(self) -> int:
        return len(self._labels) if self._index is None else len(self._index)

    def _load(self, i: int) -> Tensor:
        path = os.fsdecode(self._paths[i])
        img = load_image(path, max_pixels=self.max_pixels)
        side = max(self.min_size, self.resize or 0)
        if side:
            check_resize(path, *img.shape[-2:], side, max_pixels=self.max_pixels)
        if self.min_size and min(img.shape[-2:]) < self.min_size:
            from torchvision.transforms.v2 import functional as F

            img = F.resize(img, self.min_size, antialias=True)
        return img

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        """The sample; a file that fails to decode is marked in skipped() and replaced by the
        next usable sample (on_bad="replace": batches stay full) or None (on_bad="drop")."""
        n = len(self)
        if not -n <= index < n:  # `for x, y in ds` stops at the first IndexError: no wrap here
            raise IndexError(f"{self.root}: index {index} is out of range for {n} samples")
        index %= n
        for step in range(min(n, 64)):
            i = (index + step) % n
            i = i if self._index is None else int(self._index[i])
            try:
                img = self._load(i)
            except BadImageError as e:
                if self._skip[i] == 0:
                    self._skip[i] = _code(e.reason)
                    log.warning(
                        "skipping %s: %s (sample %d replaced by the next usable one)",
                        e.path,
                        e.reason,
                        index,
                    )
                if self.on_bad == "drop":
                    return None
                continue
            out = self.transform(img) if self.transform is not None else img
            return out, int(self._labels[i])
        raise DataError(
            f"{self.root}: 64 files in a row from sample {index} are unusable; "
            "run `reslab data check` on it"
        )

    def skipped(self) -> list[BadFile]:
        """Files that failed while training (after the up-front scan passed them)."""
        idx = torch.nonzero(self._skip).flatten().tolist()
        return [BadFile(self.samples[i][0], _SKIP_CODES[int(self._skip[i])]) for i in idx]
