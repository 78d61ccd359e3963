"""Training configuration: one typed dataclass; recipes in reslab/configs/*.yaml fill it in."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reslab.errors import UserError
from reslab.models.registry import MAX_CLASSES, MAX_INPUT_SIZE, MAX_RESIZE

MAX_PAD = 32  # section 4.2 pads 4; 32 already crops 32x32 out of a 96x96 canvas

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # package data (pyproject.toml)


class ConfigError(UserError):
    """A config value of the wrong type or out of range; the message names the field."""


class RecipeNotFound(ConfigError, FileNotFoundError):
    """--recipe names neither a file nor a recipe in configs/."""


@dataclass
class TrainConfig:
    # --- model ---
    model: str = "resnet20"  # Table 6
    model_options: dict[str, Any] = field(
        default_factory=dict
    )  # e.g. {shortcut: A, residual: false}
    num_classes: int | None = None  # None: from the data set
    weights: str | None = None  # initial weights (fine-tuning); format detected
    # --- data ---
    dataset: str = "cifar10"  # cifar10 | cifar100 | folder
    data: str | None = None  # cifar-10-batches-py's parent, or an image folder; None: $RESLAB_DATA
    # else ./data (reslab.data.resolve_data_root)
    download: bool = False  # fetch CIFAR with torchvision's downloader
    val_split: bool = True  # section 4.2: 45k train / 5k validation to pick the schedule
    # NOTE(paper): the paper chose 64k iterations on the 45k/5k split and does not say whether the
    # reported models then trained on all 50k ("about 164 epochs" is 64k x 128 / 50k; on 45k it is
    # 182). The paper recipes train on the 45k split, as section 4.2 describes it;
    # `--set val_split=false` trains on all 50k (no validation error then).
    normalization: str = "per_pixel"  # section 4.2: per-pixel mean subtracted; or per_channel
    train_subset: int | None = None  # use only the first N training images (smoke runs, tests)
    eval_subset: int | None = None  # evaluate on the first N images of each split
    folder_augment: str = (
        "imagenet"  # folders: imagenet (section 3.4 scale aug) | alexnet (256x256)
    )
    image_size: int | None = 224  # folders: crop side (section 3.4); None: the weights' own
    resize: int | None = 256  # folders: test-time shorter side; None: the weights' or size*256/224
    val_fraction: float = 0.1  # folders without val/: held-out share (stratified, seeded)
    fit_batch: bool = False  # folders: shrink batch_size to a smaller training set (finetune)
    pca_lighting: bool = False  # AlexNet's PCA colour augmentation (section 3.4 uses it)
    stats: str | None = None  # folders: `reslab data stats` file: mean image / mean+std / PCA
    # folders: decompression-bomb limit in pixels per image; None: PIL.Image.MAX_IMAGE_PIXELS
    # (about 89.5 Mpixels). Larger images are skipped and reported.
    max_pixels: int | None = None
    pad: int = 4  # section 4.2: 4 pixels padded on each side, random 32x32 crop
    flip: bool = True  # section 4.2: random horizontal flip
    # NOTE(paper): not the paper's; for the fast recipe. Each image is mirrored in every other
    # epoch (a random half in epoch 0, the other orientation next epoch, ...) instead of by a
    # fresh coin per epoch, so any two consecutive epochs show both orientations of every image
    # (K. Jordan, "94% on CIFAR-10 in 3.29 seconds", 2024). CIFAR tensor loader only.
    alternate_flip: bool = False
    # NOTE(paper): not the paper's; progressive resizing (as in fast.ai's DAWNBench runs). The
    # first `small_until` fraction of the iterations train on each augmented batch downsampled
    # to small_size x small_size ([B, 3, 32, 32] -> [B, 3, 24, 24]: 0.56x the conv FLOPs), the
    # rest at full size; the net is the same (global pooling). None: off. CIFAR loader only.
    small_size: int | None = None
    small_until: float = 0.5  # fraction of the iterations at small_size
    # --- optimisation ---
    batch_size: int = 128  # section 4.2: mini-batch 128 (global, over all devices)
    lr: float = 0.1  # section 4.2
    momentum: float = 0.9  # section 4.2
    weight_decay: float = 1e-4  # section 4.2
    # section 3.4/4.2 decay every weight; NOTE(paper): false exempts BN scales/shifts and biases
    decay_bn: bool = True
    nesterov: bool = False  # NOTE(paper): not the paper's; for the fast recipe
    label_smoothing: float = 0.0  # NOTE(paper): not the paper's; for the fast recipe
    schedule: str = "step"  # step: divide by 10 at milestones (section 4.2); or cosine, linear
    milestones: list[int] = field(default_factory=lambda: [32000, 48000])  # section 4.2
    gamma: float = 0.1  # section 4.2: divided by 10
    iters: int = 64000  # section 4.2: terminate at 64k iterations
    epochs: float | None = None  # if set, overrides iters: epochs * train images / batch_size
    warmup_iters: int = 0  # linear lr warm-up length, either schedule (not the paper's)
    warmup_lr: float | None = None  # ResNet-110 (section 4.2): 0.01 until train error < 80%
    warmup_until_error: float = 80.0  # section 4.2: then back to lr 0.1
    head_lr_mult: float = 1.0  # fine-tuning: the new classifier's lr relative to the rest
    freeze_backbone: bool = False  # fine-tuning: train the classifier only
    # --- evaluation, logging, checkpoints ---
    eval_every: int = 2000  # iterations between evaluations (and checkpoints)
    save_every: int = 1000  # iterations between checkpoints
    log_every: int = 50  # iterations between progress updates (one host sync each); one process
    # also updates once a second of wall time, whichever comes first
    eval_splits: list[str] = field(default_factory=lambda: ["val", "test"])
    # section 4.2 tests CIFAR on the single image ("center"). "flip" averages the softmax of
    # the image and its mirror (2x the eval cost); "flip-shift" of those two and both moved one
    # pixel down-right and up-left (6x, views.flip_shift); "ten-crop" 4 corners + centre and their
    # mirrors (10x): for image folders section 3.4's 10-crop of the image resized to `resize`,
    # as `reslab eval --views ten-crop`. NOTE(paper): on CIFAR, flip, flip-shift and ten-crop (of
    # the image padded by 4 pixels) are reslab extensions.
    eval_views: str = "center"
    out: str = "runs/run"  # RUN_DIR
    seed: int = 0
    # --- execution ---
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # NOTE(paper): the paper trained in fp32; "auto" takes bf16 autocast where the device has
    # native bf16 (the accuracy of every recipe was measured that way, README); fp32 is --precision.
    precision: str = "auto"  # auto (bf16 where supported) | fp32 | bf16 | fp16
    channels_last: bool = True
    # torch.compile the model. Off by default: on a 2-core CPU the gain is small or negative and
    # the first compile is slow (results/benchmarks/bench_train_session6.txt; as built here,
    # x1.01-1.03 for ResNet-20/56 at 24x24 and 32x32 against 35-67 s per shape to compile,
    # results/resnet{20,56}-cpu-progressive/compile_session11.txt). On Intel Xeon with AMX it
    # is x1.27-1.31 in alternating benchmark rounds but x0.97-0.99 in whole runs
    # (scripts/compile_ab.sh, results/cpu-kind/intel-amx-20261201), so off there too.
    compile: bool = False
    # torch.compile mode: "default"; "reduce-overhead" replays each step as a CUDA graph (small
    # CIFAR nets on a GPU are launch-bound: ResNet-110's forward alone is 109 conv + 109 BN +
    # ReLU/add ops, each a kernel of a few microseconds at batch 128); or
    # "max-autotune" / "max-autotune-no-cudagraphs". Only read when compile is on.
    compile_mode: str = "default"
    # On the CPU, compute each relu(bn(x) [+ shortcut]) of training as one fused C++ kernel
    # (models/bn_act.py, built on first use; the eager path where it cannot be built). Same
    # model, parameters and math; bf16 rounds once instead of after BN, add and ReLU. Not used
    # with compile (inductor fuses these itself) or on GPUs (cuDNN).
    fused_bn_act: bool = True
    # On CPUs with AMX, compute the blocks' 3x3 weight gradients (stride 1 and 2) with reslab's
    # own AMX kernel (16-128 channels, even widths: 1.1-2.3x oneDNN's, models/conv_wgrad.py), and
    # elsewhere on small maps (ImageNet layer3/4) sum them over images tiled side by side, which
    # oneDNN computes 1.1-2.2x faster (models/tiled_wgrad.py); where the kernel takes a stride-1
    # conv, its output and input gradient come from reslab's AMX convolution too (kernels/
    # conv_fwd.cpp). The same results in another summation order. Not used with compile or on
    # GPUs. (The name predates the kernels.)
    tiled_wgrad: bool = True
    workers: int | None = None  # DataLoader workers for image folders; None: from cores and size
    sync_bn: bool = False  # distributed: SyncBatchNorm (the paper keeps BN per device)
    # Wall-clock seconds of this call (evaluations included), then stop with a final evaluation;
    # a resumed run gets the limit afresh.
    time_limit: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from plain values, each converted to its field's declared type (YAML reads
        `1e-3` as a string; `lr: 1e-3` must still be the float 0.001) and range-checked."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown config field(s) {unknown}; known: {sorted(known)}"
            )
        hints = typing.get_type_hints(cls)
        if isinstance(d.get("model_options"), dict):
            from reslab.models.registry import normalize_options

            d = {**d, "model_options": normalize_options(d["model_options"])}
        cfg = cls(**{k: _coerce(k, v, hints[k], source) for k, v in d.items()})
        cfg.validate(source=source)
        return cfg

    def validate(self, *, source: str = "config") -> None:
        """Refuse values no run can use, naming the field (before any data is read)."""
        at_least_1 = ("batch_size", "iters", "eval_every", "save_every", "log_every", "image_size",
                      "resize", "train_subset", "eval_subset", "max_pixels")  # fmt: skip
        for name in at_least_1:
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"{source}: {name} must be a whole number >= 1, got {v!r}")
        # Sizes an image can have: a typo (pad: 1000000, image_size: 100000) would otherwise
        # surface as a multi-terabyte allocation at the first batch.
        for name, lo, hi in (("image_size", 8, MAX_INPUT_SIZE), ("resize", 8, MAX_RESIZE),
                             ("pad", 0, MAX_PAD)):  # fmt: skip
            v = getattr(self, name)
            if v is not None and isinstance(v, int) and not lo <= v <= hi:
                raise ConfigError(f"{source}: {name} must be {lo}..{hi} pixels, got {v!r}")
        for name in ("pad", "workers", "warmup_iters", "seed"):
            v = getattr(self, name)
            if name == "workers" and v is None:  # None: chosen from the cores and the data size
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
                raise ConfigError(f"{source}: {name} must be a whole number >= 0, got {v!r}")

        def number(v: Any) -> bool:  # (a TrainConfig built in Python is not coerced: lr="0.1")
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        positive = ("lr", "gamma", "epochs", "time_limit", "warmup_lr")
        for name in positive:
            v = getattr(self, name)
            if v is not None and not (number(v) and v > 0):
                raise ConfigError(f"{source}: {name} must be a number > 0, got {v!r}")
        for name in ("weight_decay", "head_lr_mult"):
            if not (number(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{source}: {name} must be >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.out, (str, os.PathLike)) or not str(self.out):
            raise ConfigError(f"{source}: out must name the run's folder, got {self.out!r}")
        if self.small_size is not None and not (
            isinstance(self.small_size, int) and 8 <= self.small_size <= 32
        ):
            raise ConfigError(
                f"{source}: small_size must be a whole number of pixels in 8..32 or null, "
                f"got {self.small_size!r}"
            )
        if self.stats is not None and self.dataset != "folder":
            # It would be ignored: a CIFAR run takes its mean from the images it trains on.
            raise ConfigError(
                f"{source}: stats (a `reslab data stats` file) is for image folders; a "
                f"{self.dataset} run computes its statistics from its own training images"
            )
        if self.small_size is not None and self.dataset == "folder":
            raise ConfigError(
                f"{source}: small_size (progressive resizing) works with the CIFAR data sets "
                f"only; for image folders set image_size instead"
            )
        # A training error in percent; nan or <= 0 would keep warmup_lr for the whole run.
        if not (
            isinstance(self.warmup_until_error, (int, float)) and 0 < self.warmup_until_error <= 100
        ):
            raise ConfigError(f"{source}: warmup_until_error must be a percentage in (0, 100], "
                              f"got {self.warmup_until_error!r}")  # fmt: skip
        for name in ("momentum", "label_smoothing", "val_fraction", "small_until"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{source}: {name} must be in [0, 1), got {getattr(self, name)}")
        if not isinstance(self.model_options, dict):
            raise ConfigError(f"{source}: model_options must be a mapping, got "
                              f"{self.model_options!r}")  # fmt: skip
        from reslab.models.registry import option_type_problem

        problem = option_type_problem(self.model_options)
        if problem:  # a builder takes residual: "no" as true; no model is built from that
            raise ConfigError(f"{source}: model_options.{problem}")
        n = self.num_classes
        if n is not None and not 2 <= n <= MAX_CLASSES:
            raise ConfigError(f"{source}: num_classes must be 2..{MAX_CLASSES}, got {n}")
        choices = {
            "dataset": ("cifar10", "cifar100", "folder"),
            "normalization": ("per_pixel", "per_channel"),
            "schedule": ("step", "cosine", "linear"),
            "precision": ("auto", "fp32", "bf16", "fp16"),
            "folder_augment": ("imagenet", "alexnet"),
            "eval_views": ("center", "flip", "flip-shift", "ten-crop"),
            # torch.compile's modes (cli.COMPILE_MODES): checked here, not at the first step
            "compile_mode": (
                "default",
                "reduce-overhead",
                "max-autotune",
                "max-autotune-no-cudagraphs",
            ),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{source}: {name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        from reslab.runtime.distributed import DEVICE_SPEC

        if not re.fullmatch(DEVICE_SPEC, str(self.device)):
            raise ConfigError(
                f"{source}: device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}"
            )
        bad_splits = sorted(set(self.eval_splits) - {"val", "test"})
        if bad_splits:
            raise ConfigError(f"{source}: eval_splits may hold val and test, got {bad_splits}")
        if any(m < 1 for m in self.milestones):
            raise ConfigError(
                f"{source}: milestones must be iterations >= 1, got {self.milestones}"
            )

    def override(self, assignments: list[str]) -> TrainConfig:
        """Apply `key=value` strings (values parsed as YAML: 0.1, [1, 2], true, {a: b})."""
        d = self.to_dict()
        for a in assignments:
            if "=" not in a:
                raise ConfigError(f"--set {a}: expects key=value, e.g. --set lr=0.05")
            key, value = a.split("=", 1)
            if key.startswith("model_options."):
                d["model_options"][key.split(".", 1)[1]] = _yaml_value(value)
                continue
            if key not in d:
                raise ConfigError(f"--set {a}: unknown config field {key!r}; known: {sorted(d)}")
            d[key] = _yaml_value(value)
        return TrainConfig.from_dict(d, source="--set")


def _yaml_value(text: str) -> Any:
    from reslab.runtime.yaml_file import (
        YamlAliasError,
        YamlDuplicateKeyError,
        YamlFileError,
        loads_yaml,
    )

    try:
        return loads_yaml(text, label=f"--set value {text[:60]!r}")
    except (YamlAliasError, YamlDuplicateKeyError) as e:  # refused as in files
        raise ConfigError(str(e)) from None
    except YamlFileError:
        return text  # e.g. an unbalanced bracket: kept as a string, then type-checked


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """`value` as the type `hint` declares, or a ConfigError naming the field and the type."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    bad = ConfigError(f"{source}: {name} expects {_type_name(hint)}, got {value!r}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                raise bad from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 1e4 -> 10000
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
            except ValueError:
                raise bad from None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. --set out=2024
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(hint)
        return [_coerce(f"{name}[{i}]", v, item, source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    return value


def _type_name(hint: Any) -> str:
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0]).removeprefix('a ')}s"
    return "a mapping" if typing.get_origin(hint) is dict else str(hint)


def list_recipes() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> TrainConfig:
    """A recipe by name (configs/NAME.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise RecipeNotFound(
            f"no recipe {name_or_path!r}: not a file, and not one of {list_recipes()} in {CONFIG_DIR}"
        )
    from reslab.runtime.yaml_file import read_yaml

    data = read_yaml(path, what="recipe") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of config fields")
    data.pop("description", None)
    return TrainConfig.from_dict(data, source=f"recipe {path}")


def save_config(cfg: TrainConfig, path: Path, extra: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump({**cfg.to_dict(), "_run": extra}, sort_keys=False))


def check_batch_divides(batch_size: int, processes: int) -> None:
    """batch_size is the global batch: each process takes an equal share of it."""
    if processes > 1 and batch_size % processes:
        lo = max(processes, batch_size // processes * processes)
        raise ConfigError(
            f"batch_size {batch_size} does not divide among {processes} processes (each takes an "
            f"equal share of the global batch); use --batch-size {lo} or {lo + processes}, or "
            "a --nproc that divides it"
        )
