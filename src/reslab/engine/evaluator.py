"""Top-1/top-5 error, per-class accuracy and the confusion matrix, for one model or an ensemble.

Counts accumulate in device tensors (no host sync per batch); under torch.distributed they are
summed over ranks at the end, so any number of processes reports what one process would.
Scores are softmax probabilities in fp32, averaged over views and over ensemble members.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from reslab.engine.views import Views, make_views
from reslab.runtime.distributed import all_reduce_sum
from reslab.runtime.precision import autocast, check_precision

Normalize = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvalResult:
    """Errors in %; confusion[i, j] counts samples of true class i predicted as j (CPU int64)."""

    top1_error: float
    top5_error: float
    loss: float  # mean cross-entropy of the (view-averaged) probabilities
    num_samples: int
    per_class_accuracy: torch.Tensor  # float64 [C], %; NaN for a class with no samples
    confusion: torch.Tensor  # int64 [C, C]
    name: str = ""

    @property
    def count(self) -> int:
        """Samples evaluated (the trainer's name for num_samples)."""
        return self.num_samples

    def to_dict(self, classes: Sequence[str] | None = None) -> dict[str, Any]:
        names = list(classes) if classes else [str(i) for i in range(len(self.confusion))]
        acc = self.per_class_accuracy.tolist()
        return {
            "name": self.name,
            "top1_error": self.top1_error,
            "top5_error": self.top5_error,
            "loss": self.loss,
            "num_samples": self.num_samples,
            "per_class_accuracy": {n: (None if a != a else a) for n, a in zip(names, acc)},
            "confusion": self.confusion.tolist(),
        }


@dataclass
class EnsembleResult:
    members: list[EvalResult]
    ensemble: EvalResult
    extra: dict[str, Any] = field(default_factory=dict)


class _Counts:
    """Running sums on the device: confusion [C, C], top-5 hits, NLL sum, bad labels."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.c = num_classes
        self.k = min(5, num_classes)
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        self.top5 = torch.zeros((), dtype=torch.int64, device=device)
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.bad = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, probs: torch.Tensor, y: torch.Tensor) -> None:
        # probs: float32 [B, C]; y: int64 [B]. Out-of-range labels are counted, not indexed,
        # so a bad label becomes a clear error at the end instead of a device-side assert.
        y = y.long()  # uint8/int16 labels index too (gather takes int64 only)
        valid = (y >= 0) & (y < self.c)
        ys = torch.where(valid, y, torch.zeros_like(y))
        pred = probs.argmax(1)
        self.confusion.scatter_add_(0, ys * self.c + pred, valid.long())
        hits = (probs.topk(self.k, 1).indices == ys[:, None]).any(1) & valid
        self.top5 += hits.sum()
        p_true = probs.gather(1, ys[:, None]).squeeze(1).clamp_min(1e-12)
        self.nll -= torch.where(valid, p_true.log(), torch.zeros_like(p_true)).double().sum()
        self.bad += (~valid).sum()

    def reduce(self) -> None:
        for t in (self.confusion, self.top5, self.nll, self.bad):
            all_reduce_sum(t)

    def result(self, name: str) -> EvalResult:
        conf = self.confusion.view(self.c, self.c).cpu()
        n = int(conf.sum())
        if int(self.bad):
            raise ValueError(
                f"{int(self.bad)} labels lie outside 0..{self.c - 1}: the data set has more "
                f"classes than the model's {self.c} outputs (pass the matching --dataset)"
            )
        if n == 0:
            raise ValueError("the loader yielded no samples; check the data directory and split")
        rows = conf.sum(1).double()
        per_class = 100.0 * conf.diag().double() / rows  # NaN where a class has no samples
        return EvalResult(
            top1_error=100.0 * (1 - int(conf.diag().sum()) / n),
            top5_error=100.0 * (1 - int(self.top5) / n),
            loss=float(self.nll) / n,
            num_samples=n,
            per_class_accuracy=per_class,
            confusion=conf,
            name=name,
        )


def view_probs(
    model: nn.Module, x: Views, *, num_classes: int | None, precision: str
) -> torch.Tensor:
    """Softmax scores averaged over views: x is [B, ...], [B, V, ...] or a list of such.
    num_classes=None takes the model's output width; `precision` is already checked."""
    batches = x if isinstance(x, list) else [x]
    total: torch.Tensor | None = None
    count = 0
    for v in batches:
        multi = v.dim() == 5  # [B, V, 3, H, W] -> the B*V crops as one batch [B*V, 3, H, W]
        flat = v.flatten(0, 1) if multi else v
        with autocast(precision, flat.device):
            logits = _forward(model, flat)
        num_classes = logits.shape[-1] if num_classes is None else num_classes
        if logits.dim() != 2 or logits.shape[1] != num_classes:
            raise ValueError(
                f"the model outputs {tuple(logits.shape)} but the data set has {num_classes} "
                "classes; pass the matching --dataset or a model built for it"
            )
        probs = logits.float().softmax(1)
        if multi:
            probs = probs.view(v.shape[0], v.shape[1], num_classes)
            total = probs.sum(1) if total is None else total + probs.sum(1)
            count += v.shape[1]
        else:
            total = probs if total is None else total + probs
            count += 1
    if total is None:
        raise ValueError("a batch with no views")
    return total / count


# Images per forward pass: ten-crop turns a 500-image batch into 5,000 crops, whose activations
# overflow the CPU's caches (ResNet-20 bf16 on 2 Zen 4 cores: ~2,500 img/s at 256-512 per pass,
# ~1,600 at 2,000). On 2 Intel AMX cores (L2 2 MiB a core), 10k CIFAR images x 6 views, folded
# ResNet-20, medians of 3: 64 -> 7.40 s, 128 -> 6.76, 256 -> 6.95, 512 -> 9.13, 1024 -> 13.61.
# 256: within 3% of the best here and inside the range measured best on Zen 4 (smaller passes
# were not timed there). Eval-mode outputs do not depend on how a batch is split.
FORWARD_CHUNK = 256
# ...and at most this many input elements per pass. A ResNet's largest activation (the stem's
# output, [N, 64, H/2, W/2]) has 5.3x its input's elements; at 224px and 256 images that is
# 411 MB in bf16, over glibc's mmap threshold as reslab sets it (runtime/memory.py: 256 MiB),
# so every pass page-faulted it in afresh (folded ResNet-50 alone, bf16: 104-106 img/s at 256
# images a pass, 136-140 at 128, peak RSS 3.2 vs 2.3 GB; a higher threshold got back less,
# 125-132, at 4.0 GB). 2^24 elements is 111 224px images a pass; 32x32 ones keep FORWARD_CHUNK.
# Measured against 256 a pass (session 43, 2 Intel AMX cores, bf16, benchmarks/ab_eval_chunk.py,
# results/benchmarks/ab_eval_chunk_intel-amx.txt): ten-crop of 32 images ResNet-50 x1.24,
# ResNet-18 x1.11-1.17; batches of 256 x1.05-1.06 and x1.14-1.23; InferenceModel (ResNet-50,
# 256 images) x1.14; CIFAR ResNet-20 six views unchanged (x0.97-1.01, the same passes).
FORWARD_ELEMENTS = 1 << 24


def forward_chunk(x: torch.Tensor) -> int:
    """Images per forward pass for the batch x ([N, ...]): FORWARD_CHUNK, and on the CPU fewer
    for large images (FORWARD_ELEMENTS; a GPU has no such cliff), at least one."""
    if x.device.type != "cpu" or len(x) == 0:
        return FORWARD_CHUNK
    return max(1, min(FORWARD_CHUNK, FORWARD_ELEMENTS // max(x[0].numel(), 1)))


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """model(x) in chunks of forward_chunk(x) images, with x in the model's memory format (a
    channels_last model given NCHW inputs would reorder every chunk inside the first conv)."""
    if x.dim() == 4 and _is_channels_last(model):
        x = x.contiguous(memory_format=torch.channels_last)
    chunk = forward_chunk(x)
    if len(x) <= chunk:
        return model(x)
    return torch.cat([model(part) for part in x.split(chunk)])


def _is_channels_last(model: nn.Module) -> bool:
    w = next((p for p in model.parameters() if p.dim() == 4), None)
    return (
        w is not None
        and w.is_contiguous(memory_format=torch.channels_last)
        and not w.is_contiguous()
    )


def _to_device(x: Views, device: torch.device) -> Views:
    if isinstance(x, (list, tuple)):
        return [t.to(device, non_blocking=True) for t in x]
    return x.to(device, non_blocking=True)


@torch.no_grad()
def evaluate_ensemble(
    models: Sequence[nn.Module],
    loader: Iterable[tuple[Views, torch.Tensor]],
    *,
    device: torch.device | str,
    precision: str = "fp32",
    num_classes: int | None = None,
    views: str = "center",
    scales: Sequence[int] | None = None,
    crop: int | None = None,
    normalizers: Sequence[Normalize | None] | None = None,
    names: Sequence[str] | None = None,
) -> EnsembleResult:
    """Evaluate each member and the average of their softmax scores in one pass over `loader`.

    loader yields (x, y). Without `normalizers`, x is the network input; with them, x is the raw
    batch (e.g. uint8 [B, 3, H, W]) and member i sees normalizers[i](x), so members trained with
    different preprocessing share one loader. A normalizer is a callable or a
    `reslab.data.preprocess.Preprocess` (a checkpoint's, or `load_stats(FILE).preprocess()`).
    Views are made after normalisation.
    """
    device, precision = torch.device(device), check_precision(precision)
    if not models:
        raise ValueError("no models to evaluate")
    norms = (
        [_as_normalizer(n) for n in normalizers]
        if normalizers is not None
        else [None] * len(models)
    )
    labels = list(names) if names is not None else [f"model{i}" for i in range(len(models))]
    if len(norms) != len(models) or len(labels) != len(models):
        raise ValueError("normalizers and names must have one entry per model")
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    counts: list[_Counts] = []  # made at the first batch, once the class count is known
    joint: _Counts | None = None
    try:
        for x, y in loader:
            x, y = _to_device(x, device), y.to(device, non_blocking=True)
            raw = (x[0] if isinstance(x, list) else x).dtype == torch.uint8
            mean: torch.Tensor | None = None
            for i, (model, norm) in enumerate(zip(models, norms)):
                xi = x if norm is None else _apply(norm, x)
                try:
                    probs = view_probs(
                        model,
                        make_views(xi, views, size=crop, scales=scales),
                        num_classes=num_classes,
                        precision=precision,
                    )
                except RuntimeError as e:
                    if not (raw and norm is None) or isinstance(
                        e, getattr(torch, "OutOfMemoryError", ())
                    ):
                        raise
                    # A model that normalises inside its forward may take uint8; others fail in
                    # their first layer with a dtype error that does not say what to do.
                    raise TypeError(
                        "the loader gives uint8 images: pass normalize= (evaluate) or "
                        "normalizers= (evaluate_ensemble), a callable or a Preprocess, e.g. a "
                        "checkpoint's or reslab.data.stats.load_stats(FILE).preprocess() "
                        f"({str(e).splitlines()[0][:80]})"
                    ) from None
                if len(counts) < len(models):
                    num_classes = probs.shape[1]
                    counts.append(_Counts(num_classes, device))
                counts[i].add(probs, y)
                mean = probs if mean is None else mean + probs
            if len(models) > 1 and mean is not None:
                joint = joint or _Counts(mean.shape[1], device)
                joint.add(mean / len(models), y)
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
    if not counts:
        # Every rank must join the all-reduces; a rank without batches cannot know the class
        # count, so this needs it given.
        if num_classes is None:
            raise ValueError("the loader yielded no samples; check the data directory and split")
        counts = [_Counts(num_classes, device) for _ in models]
    if len(models) > 1 and joint is None:
        joint = _Counts(counts[0].c, device)
    for cnt in [*counts, *([joint] if joint is not None else [])]:
        cnt.reduce()
    members = [c.result(n) for c, n in zip(counts, labels)]
    ensemble = joint.result("ensemble") if joint is not None else members[0]
    return EnsembleResult(members=members, ensemble=ensemble)


def _as_normalizer(norm: object) -> Normalize | None:
    """A Preprocess becomes its normalisation (any input size, as `reslab eval` applies it);
    so does the dict a checkpoint stores as its `preprocess` (also `WeightsInfo.preprocess`)."""
    from reslab.data.preprocess import Preprocess

    if isinstance(norm, dict):
        norm = Preprocess.from_dict(norm)
    if isinstance(norm, Preprocess):
        from reslab.engine.eval_run import normalizer  # here: eval_run imports this module

        return normalizer(norm)
    if norm is not None and not callable(norm):
        raise TypeError(
            f"normalize must be a callable, a Preprocess or a checkpoint's preprocess dict, "
            f"not {type(norm).__name__}"
        )
    return norm  # type: ignore[return-value]


def _apply(norm: Normalize, x: Views) -> Views:
    return [norm(t) for t in x] if isinstance(x, list) else norm(x)


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Views, torch.Tensor]],
    *,
    device: torch.device | str,
    precision: str = "fp32",
    num_classes: int | None = None,
    views: str = "center",
    scales: Sequence[int] | None = None,
    crop: int | None = None,
    normalize: Normalize | None = None,
) -> EvalResult:
    """Top-1/top-5 error (%), per-class accuracy and confusion matrix of `model` on `loader`.

    num_classes: the model's output width when None (give it under torch.distributed when a
    rank may see no batch). views="center": x is [B, 3, H, W]. "flip" / "ten-crop" /
    "multi-scale": x may already hold the views
    ([B, V, 3, H, W] or a list of per-scale batches); a plain [B, 3, H, W] batch is turned into
    them on the device (reslab.engine.views). Softmax scores are averaged over views.
    """
    return evaluate_ensemble(
        [model],
        loader,
        device=device,
        precision=precision,
        num_classes=num_classes,
        views=views,
        scales=scales,
        crop=crop,
        normalizers=[normalize],
        names=[getattr(model, "name", type(model).__name__)],
    ).ensemble
