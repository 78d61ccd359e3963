"""CIFAR-10/100 in the standard python-pickle layout, read with numpy into uint8 tensors.

No checksum is checked: copies with the official pixels and labels but other file digests are
common, and a wrong file is caught by its shape and label range instead.
"""

from __future__ import annotations

import contextlib
import functools
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reslab.errors import UserError, first_line

DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta"),
    "cifar100": (["train"], ["test"], "meta"),
}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
SPLITS = ("train", "test", "train45k", "val5k")
VAL_SIZE = 5000  # section 4.2: 45k/5k train/validation split
SPLIT_SEED = 0  # fixed, so every run sees the same validation images


class DataError(UserError):
    """A data set that cannot be used; the message names the file and the fix."""


class UnsafeDataError(DataError):
    """A batch file whose pickle asks for something the CIFAR format never holds (it could run
    code when unpickled)."""


def _checked_dtype(*args: object) -> np.dtype:
    dt = np.dtype(*args)  # type: ignore[call-overload]
    if dt.hasobject:  # an object array unpickles arbitrary objects
        raise pickle.UnpicklingError(f"object dtype {dt} is not allowed")
    return dt


# Everything a CIFAR batch pickle holds besides plain dicts, lists, str, bytes and ints: numpy
# arrays (ndarray + its reconstructor, named numpy.core or numpy._core by the numpy that wrote the
# file; taken from ndarray.__reduce__ so that no deprecated module is imported) and their
# (non-object) dtypes.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _checked_dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Refuses every global outside _ALLOWED, so a crafted batch file cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed") from None


@dataclass
class CifarSplit:
    images: torch.Tensor  # uint8 [N, 3, 32, 32]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]


def cifar_dir(root: str | Path, dataset: str) -> Path:
    if dataset not in DIRS:
        raise ValueError(f"dataset must be one of {sorted(DIRS)}, got {dataset!r}")
    return Path(root) / DIRS[dataset]


def _missing_message(root: Path, dataset: str) -> str:
    train, test, meta = _FILES[dataset]
    return (
        f"{dataset} not found: expected the directory {cifar_dir(root, dataset)} holding "
        f"{', '.join([*train, *test, meta])} (the python version from "
        "https://www.cs.toronto.edu/~kriz/cifar.html, extracted). Put them there, or fetch "
        f"them with `{_fetch_command(root, dataset)}` (train and demo also take --download)."
    )


def check_cifar_files(root: str | Path, dataset: str = "cifar10") -> None:
    """DataError naming what is missing, before a command creates anything; reads no data."""
    base = cifar_dir(root, dataset)
    train, test, meta_name = _FILES[dataset]
    if not base.is_dir():
        raise DataError(_missing_message(Path(root), dataset))
    for n in (*train, *test, meta_name):
        if not (base / n).is_file():
            raise DataError(
                f"{base / n} is missing ({dataset} needs {', '.join([*train, *test, meta_name])} "
                f"in {base}); re-extract the archive there, or fetch it again with "
                f"`{_fetch_command(Path(root), dataset)}`"
            )


def _fetch_command(root: Path, dataset: str) -> str:
    # A command every subcommand's user can run: eval and reproduce have no --download flag.
    return f"reslab data download {root}" + (
        "" if dataset == "cifar10" else f" --dataset {dataset}"
    )


def _unpickle(path: Path) -> dict:
    """Read a batch with the restricted unpickler: only what the CIFAR format holds."""
    if path.is_dir():
        raise DataError(f"{path} is a directory, expected a CIFAR batch file; re-extract it")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); check the file") from None
    try:
        d = _CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        if "not allowed" in str(e):
            raise UnsafeDataError(
                f"{path}: refusing to read it: its pickle asks for {first_line(e)}, which a "
                "CIFAR batch never holds (it could run code); replace the file with the "
                "official one"
            ) from None
        raise DataError(f"{path}: cannot be read as a CIFAR pickle ({e}); re-extract it") from None
    except Exception as e:  # truncated or not a pickle at all
        raise DataError(
            f"{path}: cannot be read as a CIFAR pickle ({type(e).__name__}: {first_line(e)}); "
            "re-extract it"
        ) from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: holds a {type(d).__name__}, not a CIFAR batch dict")
    return d


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    key = "labels" if "labels" in d else "fine_labels"
    if "data" not in d or key not in d:
        raise DataError(f"{path}: no 'data'/'{key}' entries; this is not a CIFAR batch file")
    try:
        data = np.asarray(d["data"])
        labels = np.asarray(d[key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DataError(
            f"{path}: data/labels are not arrays of numbers ({e}); re-extract it"
        ) from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path}: data has shape {data.shape} and dtype {data.dtype}, expected uint8 "
            "[N, 3072]; the file is damaged or from another data set"
        )
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: labels span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}"
        )
    return data, labels


@functools.lru_cache(maxsize=8)
def _load_cached(root: str, dataset: str, part: str) -> CifarSplit:
    base = cifar_dir(root, dataset)
    train, test, meta_name = _FILES[dataset]
    names = train if part == "train" else test
    try:
        batches = [_read_batch(base / n, _NUM_CLASSES[dataset]) for n in names]
        meta = _unpickle(base / meta_name)
    except FileNotFoundError as e:
        if base.is_dir():  # the directory is there but one file is not: name it
            raise DataError(
                f"{e.filename} is missing ({dataset} needs {', '.join([*train, *test, meta_name])}"
                f" in {base}); re-extract the archive there, or fetch it again with "
                f"`{_fetch_command(Path(root), dataset)}`"
            ) from None
        raise DataError(_missing_message(Path(root), dataset)) from None
    data = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    names = (
        meta.get("label_names") or meta.get("fine_label_names") if isinstance(meta, dict) else None
    )
    n = _NUM_CLASSES[dataset]
    if not (isinstance(names, list) and len(names) == n and all(isinstance(c, str) for c in names)):
        # The labels (checked per batch) index these names: the model's classes come from here.
        raise DataError(
            f"{base / meta_name}: expected {n} class names, got {str(names)[:60]}; re-extract the "
            f"archive there, or fetch it again with `{_fetch_command(Path(root), dataset)}`"
        )
    classes = list(names)
    images = torch.from_numpy(data).view(-1, 3, 32, 32)  # rows are R plane, G plane, B plane
    return CifarSplit(images, torch.from_numpy(labels), classes)


def split_indices(n: int, *, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The 45k/5k split (section 4.2): a fixed random permutation, last 5000 for validation."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:-VAL_SIZE].sort().values, perm[-VAL_SIZE:].sort().values


def load_cifar(root: str | Path, *, dataset: str = "cifar10", split: str = "train") -> CifarSplit:
    """One split as uint8 [N, 3, 32, 32] + int64 [N]: train (50k), test, train45k, val5k."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cifar_dir(root, dataset)  # validates the name
    whole = _load_cached(str(Path(root).resolve()), dataset, "test" if split == "test" else "train")
    if split in ("train", "test"):
        return whole
    train_idx, val_idx = split_indices(len(whole.labels))
    idx = train_idx if split == "train45k" else val_idx
    return CifarSplit(whole.images[idx], whole.labels[idx], whole.classes)


def mean_image(images: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean of a uint8 [N, 3, H, W] set -> float [3, H, W] on the 0-1 scale."""
    total = images.sum(0, dtype=torch.int64).to(torch.float64)  # exact, no [N, ...] float copy
    return (total / (255.0 * len(images))).to(torch.float32)


def download_cifar(root: str | Path, *, dataset: str = "cifar10") -> Path:
    """Fetch CIFAR-10/100 with torchvision's downloader into `root`, unless our reader already
    reads it there (torchvision would re-download copies whose file digests differ from its own).
    Offline, the error says which files to put in which directory. Returns the data directory."""
    target = cifar_dir(root, dataset)
    try:
        load_cifar(root, dataset=dataset, split="test")
        return target
    except DataError:
        pass
    # a file where the folder (or one above it) would go: one line naming it, before any fetch
    blocking = next((p for p in (Path(root), *Path(root).parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise DataError(f"{blocking} is a file, not a folder: give `reslab data download` a "
                        "folder to put the data set in (it is made if missing)")  # fmt: skip
    from torchvision import datasets

    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    made = [p for p in (Path(root), *Path(root).parents) if not p.exists()]  # deepest first
    Path(root).mkdir(parents=True, exist_ok=True)
    try:
        cls(str(root), train=True, download=True)
    except Exception as e:  # URLError, socket timeout, HTTP error, bad archive
        for p in made:  # the directories made for it, if still empty (an offline call leaves none)
            with contextlib.suppress(OSError):
                p.rmdir()
        train, test, meta = _FILES[dataset]
        raise DataError(
            f"could not download {dataset} ({type(e).__name__}: {e}). Offline: fetch "
            f"{cls.url} on a connected machine, extract it, and put "
            f"{', '.join([*train, *test, meta])} in the directory {target}/"
        ) from None
    _load_cached.cache_clear()
    load_cifar(root, dataset=dataset, split="test")  # validates what arrived
    return target
