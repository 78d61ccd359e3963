"""Training configuration: one typed dataclass; recipes in reslab/configs/*.yaml fill it in."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # package data (pyproject.toml)


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
    data: str = "data"  # directory holding cifar-10-batches-py, or an image folder
    download: bool = False  # fetch CIFAR with torchvision's downloader
    val_split: bool = True  # section 4.2: 45k train / 5k validation to pick the schedule
    normalization: str = "per_pixel"  # section 4.2: per-pixel mean subtracted; or per_channel
    train_subset: int | None = None  # use only the first N training images (smoke runs, tests)
    eval_subset: int | None = None  # evaluate on the first N images of each split
    folder_augment: str = (
        "imagenet"  # folders: imagenet (section 3.4 scale aug) | alexnet (256x256)
    )
    image_size: int = 224  # folders: crop side (section 3.4)
    resize: int = 256  # folders: shorter side before the centre crop at test time
    pca_lighting: bool = False  # AlexNet's PCA colour augmentation (section 3.4 uses it)
    stats: str | None = None  # `reslab data stats` file: mean image / mean+std / PCA eigen
    pad: int = 4  # section 4.2: 4 pixels padded on each side, random 32x32 crop
    flip: bool = True  # section 4.2: random horizontal flip
    # --- optimisation ---
    batch_size: int = 128  # section 4.2: mini-batch 128 (global, over all devices)
    lr: float = 0.1  # section 4.2
    momentum: float = 0.9  # section 4.2
    weight_decay: float = 1e-4  # section 4.2
    nesterov: bool = False  # NOTE(paper): not the paper's; for the fast recipe
    label_smoothing: float = 0.0  # NOTE(paper): not the paper's; for the fast recipe
    schedule: str = "step"  # step: divide by 10 at milestones (section 4.2); or cosine
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
    log_every: int = 50  # iterations between progress-bar updates (one host sync each)
    eval_splits: list[str] = field(default_factory=lambda: ["val", "test"])
    out: str = "runs/run"  # RUN_DIR
    seed: int = 0
    # --- execution ---
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where supported) | fp32 | bf16 | fp16
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    # torch.compile mode: "default"; "reduce-overhead" replays each step as a CUDA graph (small
    # CIFAR nets on a GPU are launch-bound: ResNet-110's forward alone is 109 conv + 109 BN +
    # ReLU/add ops, each a kernel of a few microseconds at batch 128); or
    # "max-autotune" / "max-autotune-no-cudagraphs". Only read when compile is on.
    compile_mode: str = "default"
    workers: int = 4  # DataLoader workers for image folders
    sync_bn: bool = False  # distributed: SyncBatchNorm (the paper keeps BN per device)
    time_limit: float | None = None  # seconds of training, then stop with a final evaluation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def override(self, assignments: list[str]) -> TrainConfig:
        """Apply `key=value` strings (values parsed as YAML: 0.1, [1, 2], true, {a: b})."""
        d = self.to_dict()
        for a in assignments:
            if "=" not in a:
                raise ValueError(f"--set expects key=value, got {a!r}")
            key, value = a.split("=", 1)
            if key.startswith("model_options."):
                d["model_options"][key.split(".", 1)[1]] = yaml.safe_load(value)
                continue
            if key not in d:
                raise ValueError(f"unknown config field {key!r}; known: {sorted(d)}")
            d[key] = yaml.safe_load(value)
        return TrainConfig.from_dict(d)


def list_recipes() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> TrainConfig:
    """A recipe by name (configs/NAME.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"no recipe {name_or_path!r}: not a file, and not one of {list_recipes()} in {CONFIG_DIR}"
        )
    data = yaml.safe_load(path.read_text()) or {}
    data.pop("description", None)
    return TrainConfig.from_dict(data)


def save_config(cfg: TrainConfig, path: Path, extra: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump({**cfg.to_dict(), "_run": extra}, sort_keys=False))
