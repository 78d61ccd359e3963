"""On-device CIFAR loader: the whole split is one uint8 tensor, augmentation is batched tensor ops.

Every random choice is a pure function of (seed, epoch, step), so the loader's whole state is
three integers and a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from reslab.data.preprocess import Preprocess
from reslab.data.transforms import PCALighting


def _generator(device: torch.device, *words: int) -> torch.Generator:
    seed = int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(seed & ((1 << 63) - 1))


def _take(t: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
    """t[idx] along dim 0. index_select copies whole rows: on the CPU ~16x faster than advanced
    indexing, which goes element by element (7 vs 119 us for 128 CIFAR images); same values."""
    return t.index_select(0, idx) if isinstance(idx, torch.Tensor) else t[idx]


def crop_windows(
    n: int,
    h: int,
    w: int,
    *,
    pad: int,
    flip: bool,
    generator: torch.Generator,
    device: torch.device,
    first: int = 0,
    total: int | None = None,
    mirror: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """pad_crop_flip's random draws for n images of h x w: (rows [N, H], cols [N, W]), the padded
    image's row and column each output pixel comes from (cols reversed for a mirrored image)."""
    total = n if total is None else total
    part = slice(first, first + n)
    oy = torch.randint(0, 2 * pad + 1, (total, 1), device=device, generator=generator)[part]
    ox = torch.randint(0, 2 * pad + 1, (total, 1), device=device, generator=generator)[part]
    ar_h, ar_w = torch.arange(h, device=device), torch.arange(w, device=device)
    rows = oy + ar_h  # [N, H]
    cols = ox + ar_w  # [N, W]
    if flip:
        if mirror is None:
            mirror = torch.rand(total, 1, device=device, generator=generator)[part] < 0.5
        cols = torch.where(mirror.view(n, 1), ox + (w - 1) - ar_w, cols)
    return rows, cols


def pad_crop_flip(
    x: torch.Tensor,
    *,
    pad: int,
    flip: bool,
    generator: torch.Generator,
    first: int = 0,
    total: int | None = None,
    mirror: torch.Tensor | None = None,
) -> torch.Tensor:
    """Section 4.2 augmentation of a batch [N, C, H, W]: zero-pad `pad` pixels on each side, take
    a random HxW crop, mirror half the images. One gather for crop and flip together.

    `x` may be the slice [first, first + N) of a batch of `total` images: the random draws are
    made for all `total` and sliced, so k ranks holding the k shares of a global batch augment
    it exactly as one process holding all of it would. `mirror` (bool [N], with flip): which
    images to mirror, instead of a coin per image.
    """
    n, _, h, w = x.shape
    if pad == 0 and not flip:
        return x
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x  # [N, C, H+2p, W+2p]
    rows, cols = crop_windows(n, h, w, pad=pad, flip=flip, generator=generator, device=x.device,
                              first=first, total=total, mirror=mirror)  # fmt: skip
    # One torch.gather over each image's flattened NHWC pixels: 2-5x faster on CPU than
    # advanced indexing, same values. idx [N, H*W] = source pixel of every output pixel.
    c, wp = x.shape[1], w + 2 * pad
    idx = (rows[:, :, None] * wp + cols[:, None, :]).view(n, h * w)
    src = xp.permute(0, 2, 3, 1).reshape(n, -1, c)  # [N, (H+2p)*(W+2p), C]
    out = torch.gather(src, 1, idx[:, :, None].expand(n, h * w, c)).view(n, h, w, c)
    return out.permute(0, 3, 1, 2)  # [N, C, H, W] view with channels-last strides


class ShardedOrder:
    """The sample order shared by both loaders, and their whole resumable state.

    batch_size is the global batch; with world_size > 1 each rank takes its contiguous share of
    every global batch, so k ranks step in lockstep over the same sample order as one process.
    train=True: a fresh permutation per epoch from (seed, epoch), last partial batch dropped.
    train=False: fixed order, every sample once, ranks split the set into contiguous parts.
    State: (epoch, step, seed) — the position after the last batch handed out.
    """

    batch_size: int
    train: bool
    seed: int
    rank: int
    world_size: int

    def _init_order(self, n: int, batch_size: int, world_size: int) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must divide by world size {world_size}")
        self._n = n
        self.epoch, self.step = 0, 0

    def _eval_range(self) -> tuple[int, int]:
        per = -(-self._n // self.world_size)
        return min(self._n, self.rank * per), min(self._n, (self.rank + 1) * per)

    def __len__(self) -> int:
        """Batches per epoch (train) or per pass over this rank's share (eval)."""
        if self.train:
            return self._n // self.batch_size
        lo, hi = self._eval_range()
        return -(-(hi - lo) // (self.batch_size // self.world_size))

    def epoch_order(self) -> torch.Tensor:
        """This epoch's sample order (train): a CPU int64 permutation drawn from (seed, epoch) on
        the CPU, so the order is the same whatever device the loader feeds."""
        g = _generator(torch.device("cpu"), self.seed, self.epoch, 0xC1FA)
        return torch.randperm(self._n, generator=g)

    def index_batches(
        self, order: torch.Tensor | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(step, this rank's sample indices) from the current position: slices of `order`
        (default: `epoch_order()`, on the CPU) when training, CPU aranges when evaluating."""
        share = self.batch_size // self.world_size
        if self.train:
            order = self.epoch_order() if order is None else order
            for step in range(self.step, len(self)):
                start = step * self.batch_size + self.rank * share
                yield step, order[start : start + share]
        else:
            lo, hi = self._eval_range()
            for step, start in enumerate(range(lo, hi, share)):
                yield step, torch.arange(start, min(hi, start + share))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.seed = int(state["seed"])


class TensorLoader(ShardedOrder):
    """Batches of a uint8 [N, 3, H, W] tensor that lives on the training device; augmentation
    (pad/crop/flip) is batched tensor ops there, drawn from (seed, epoch, step, rank). On the
    CPU, where reslab's kernels are built (a training run's CPU paths build them), the crops and
    flips so drawn are applied with the normalisation in one pass (`_augmented_by_kernel`): the
    same bits, x3.1 faster for 128 CIFAR images (benchmarks/ab_session35.py).

    alternate_flip: image i is mirrored in epoch e iff base[i] xor (e odd), base a fixed random
    half of the set drawn from the seed (TrainConfig.alternate_flip); a pure function of
    (seed, epoch, index) like every other draw, so resume and world size leave it unchanged.
    small_size / small_iters: training batches of the first `small_iters` iterations (counted
    as epoch * len(self) + step, so a pure function of the position too) are downsampled after
    augmentation to small_size x small_size (progressive resizing, TrainConfig.small_size).
    lighting: AlexNet's PCA colour augmentation on training batches (None: off). It shifts each
    image's colour before the pad/crop, so padded pixels stay at the mean, and draws from its own
    (seed, epoch, step, rank) stream, so the crops and flips are the same with and without it.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        preprocess: Preprocess,
        train: bool,
        seed: int = 0,
        pad: int = 4,
        flip: bool = True,
        alternate_flip: bool = False,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = True,
        dtype: torch.dtype = torch.float32,
        lighting: PCALighting | None = None,
        small_size: int | None = None,
        small_iters: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {images.dtype} {images.shape}"
            )
        if len(labels) != len(images):  # zip-like truncation would drop images silently
            raise ValueError(f"{len(images)} images but {len(labels)} labels; give one label each")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
            raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)} (channels "
                             "last? permute(0, 3, 1, 2) them)")  # fmt: skip
        self._init_order(len(labels), batch_size, world_size)
        self.images, self.labels = images, labels.to(images.device)
        self.batch_size, self.preprocess, self.train = batch_size, preprocess, train
        self.seed, self.pad, self.flip = seed, pad, flip
        self.rank, self.world_size = rank, world_size
        self.channels_last, self.dtype = channels_last, dtype
        self.lighting = lighting
        self.small_size, self.small_iters = small_size, small_iters
        self._flip_base: torch.Tensor | None = None
        self._kernel_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # scale, shift
        if alternate_flip and flip and train:
            g = _generator(torch.device("cpu"), seed, 0xF11B)
            self._flip_base = (torch.rand(len(labels), generator=g) < 0.5).to(images.device)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def _augmented_by_kernel(self, idx: torch.Tensor | slice, step: int) -> torch.Tensor | None:
        """The training batch _batch would make (before any downsampling) from the CPU kernels'
        crop_normalize (kernels/augment.cpp: one pass instead of six), where it applies: a CPU
        training batch of 3-channel images, fp32, no PCA lighting, the kernels already built
        (the trainer's CPU paths build them); else None. The same draws, the same bits."""
        from reslab.models.bn_act import loaded_kernel  # here: data/ loads without models/

        ext = loaded_kernel()
        if ext is None or not isinstance(idx, torch.Tensor) or self.lighting is not None:
            return None
        if idx.dtype != torch.long or idx.device.type != "cpu":
            return None
        im = self.images
        if im.device.type != "cpu" or im.shape[1] != 3 or self.dtype != torch.float32:
            return None
        if not im.is_contiguous() or not (self.pad or self.flip):
            return None
        if self._kernel_stats is None:
            h, w = im.shape[2:]
            scale, shift = self.preprocess._stats(im.device, torch.float32)
            self._kernel_stats = tuple(t.expand(3, h, w).contiguous() for t in (scale, shift))
        rows, cols = crop_windows(len(idx), *im.shape[2:], pad=self.pad, flip=self.flip,
                                  device=im.device, **self._draws(idx, step))  # fmt: skip
        return ext.crop_normalize(im, idx.contiguous(), rows.contiguous(), cols.contiguous(),
                                  *self._kernel_stats, self.pad)  # fmt: skip

    def _draws(self, idx: torch.Tensor | slice, step: int) -> dict:
        """pad_crop_flip's random stream and this rank's part of the global batch's draws."""
        # One random stream per global batch (no rank in the seed); each rank takes its slice of
        # the draws, so the augmentation does not depend on the world size.
        g = _generator(self.device, self.seed, self.epoch, step, 0)
        share = self.batch_size // self.world_size
        mirror = None
        if self._flip_base is not None:  # bool [B]: base half, inverted in odd epochs
            mirror = self._flip_base[idx] ^ bool(self.epoch % 2)
        return {"generator": g, "first": self.rank * share, "total": self.batch_size,
                "mirror": mirror}  # fmt: skip

    def _batch(self, idx: torch.Tensor | slice, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._augmented_by_kernel(idx, step) if self.train else None
        if x is not None:
            return self._finish(x, idx, step)
        x = self.preprocess.normalize(_take(self.images, idx), dtype=self.dtype)  # [B, 3, H, W]
        if self.train and self.lighting is not None:
            # (x/255 + rgb - mean)/std = normalize(x) + rgb/std: one offset per image [B, 3].
            # Drawn for the whole global batch, this rank's slice taken (world-size independent).
            gl = _generator(self.device, self.seed, self.epoch, step, 0, 0x11647)
            share = self.batch_size // self.world_size
            rgb = self.lighting.shifts(self.batch_size, device=x.device, generator=gl)
            rgb = rgb[self.rank * share : self.rank * share + x.shape[0]]
            x = x + (rgb / self.preprocess.channel_std(x.device)).to(x.dtype)[:, :, None, None]
        if self.train:
            x = pad_crop_flip(x, pad=self.pad, flip=self.flip, **self._draws(idx, step))
            return self._finish(x, idx, step)
        return self._layout(x), _take(self.labels, idx)

    def _finish(self, x: torch.Tensor, idx: torch.Tensor | slice, step: int):
        """An augmented training batch downsampled where progressive resizing asks, laid out."""
        if self.small_size and self.epoch * len(self) + step < self.small_iters:
            # [B, 3, 32, 32] -> [B, 3, s, s]; antialiased, so the small image is the whole
            # crop seen at lower resolution rather than an aliased subsample of it.
            x = F.interpolate(x, size=(self.small_size,) * 2, mode="bilinear",
                              antialias=True, align_corners=False)  # fmt: skip
        return self._layout(x), _take(self.labels, idx)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def _device_order(self) -> torch.Tensor:
        """The epoch's order on the device: one host-to-device copy per epoch, so that a step
        copies nothing from the host (a copy from pageable memory would also block the host
        until the GPU caught up: from pinned memory it is queued like a kernel)."""
        order = self.epoch_order()
        if self.device.type == "cuda":
            order = order.pin_memory()
        return order.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.train:
            for step, idx in self.index_batches(self._device_order()):
                self.step = step + 1  # position after this batch, for a checkpoint taken now
                yield self._batch(idx, step)
            self.epoch, self.step = self.epoch + 1, 0
            return
        # Evaluation goes through the split in order: contiguous slices, no index tensor at all.
        lo, hi = self._eval_range()
        share = self.batch_size // self.world_size
        for start in range(lo, hi, share):
            yield self._batch(slice(start, min(hi, start + share)), 0)


class _SeededSample(torch.utils.data.Dataset):
    """Seeds torch's RNG from (seed, epoch, index) before each sample's random transform, so the
    augmentation of every image is a pure function of the run's position, on any worker."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        torch.manual_seed(
            int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        )
        return self.dataset[index]


class _GlobalBatches(torch.utils.data.Sampler):
    """The loader's index batches as (epoch, index) keys for _SeededSample."""

    def __init__(self, loader: FolderLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader) - (self.loader.step if self.loader.train else 0)

    def __iter__(self):
        epoch = self.loader.epoch
        for _, idx in self.loader.index_batches():
            yield [(epoch, i) for i in idx.tolist()]


class FolderLoader(ShardedOrder):
    """Image-folder batches with the TensorLoader interface: decoding and geometric transforms in
    DataLoader workers on uint8 tensors, normalisation and PCA lighting batched on the device.

    Same sample order and sharding as TensorLoader; state is (epoch, step, seed), and each
    image's random crop is seeded from (seed, epoch, index), so resumed runs continue exactly.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        *,
        batch_size: int,
        preprocess: Preprocess,
        train: bool,
        device: torch.device,
        seed: int = 0,
        lighting: torch.nn.Module | None = None,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 4,
        channels_last: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self._init_order(len(dataset), batch_size, world_size)  # type: ignore[arg-type]
        self.dataset = dataset
        self.batch_size, self.preprocess, self.train = batch_size, preprocess, train
        self.device, self.seed, self.lighting = device, seed, lighting
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.channels_last, self.dtype = channels_last, dtype
        self._dl: torch.utils.data.DataLoader | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from reslab.data.transforms import prepare_batch

        if self._dl is None:
            # One DataLoader for the loader's life: its workers persist across epochs (starting
            # them anew each epoch costs more than decoding a small folder; README, Train).
            # The sampler reads epoch/step at each pass, so the order stays exactly resumable.
            self._dl = torch.utils.data.DataLoader(
                _SeededSample(self.dataset, self.seed), batch_sampler=_GlobalBatches(self),
                num_workers=self.workers, pin_memory=self.device.type == "cuda",
                persistent_workers=self.workers > 0,
            )  # fmt: skip
        dl = self._dl
        step = self.step
        for x, y in dl:
            # One lighting stream per global batch; this rank takes its slice of the draws.
            g = _generator(self.device, self.seed, self.epoch, step, 0)
            share = self.batch_size // self.world_size
            x = prepare_batch(
                x, preprocess=self.preprocess, device=self.device,
                lighting=self.lighting if self.train else None, generator=g,
                channels_last=self.channels_last, dtype=self.dtype,
                first=self.rank * share, total=self.batch_size,
            )  # fmt: skip
            step += 1
            if self.train:
                self.step = step
            yield x, y.to(self.device, non_blocking=True)
        if self.train:
            self.epoch, self.step = self.epoch + 1, 0
