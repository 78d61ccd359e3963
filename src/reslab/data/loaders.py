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


def _generator(device: torch.device, *words: int) -> torch.Generator:
    seed = int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(seed & ((1 << 63) - 1))


def pad_crop_flip(
    x: torch.Tensor,
    *,
    pad: int,
    flip: bool,
    generator: torch.Generator,
    first: int = 0,
    total: int | None = None,
) -> torch.Tensor:
    """Section 4.2 augmentation of a batch [N, C, H, W]: zero-pad `pad` pixels on each side, take
    a random HxW crop, mirror half the images. One gather for crop and flip together.

    `x` may be the slice [first, first + N) of a batch of `total` images: the random draws are
    made for all `total` and sliced, so k ranks holding the k shares of a global batch augment
    it exactly as one process holding all of it would.
    """
    n, _, h, w = x.shape
    dev = x.device
    if pad == 0 and not flip:
        return x
    total = n if total is None else total
    part = slice(first, first + n)
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x  # [N, C, H+2p, W+2p]
    oy = torch.randint(0, 2 * pad + 1, (total, 1), device=dev, generator=generator)[part]
    ox = torch.randint(0, 2 * pad + 1, (total, 1), device=dev, generator=generator)[part]
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = oy + ar_h  # [N, H]
    cols = ox + ar_w  # [N, W]
    if flip:
        mirror = torch.rand(total, 1, device=dev, generator=generator)[part] < 0.5
        cols = torch.where(mirror, ox + (w - 1) - ar_w, cols)
    # One torch.gather over each image's flattened NHWC pixels: 2-5x faster on CPU than
    # advanced indexing, same values. idx [N, H*W] = source pixel of every output pixel.
    c, wp = x.shape[1], w + 2 * pad
    idx = (rows[:, :, None] * wp + cols[:, None, :]).view(n, h * w)
    src = xp.permute(0, 2, 3, 1).reshape(n, -1, c)  # [N, (H+2p)*(W+2p), C]
    out = torch.gather(src, 1, idx[:, :, None].expand(n, h * w, c)).view(n, h, w, c)
    return out.permute(0, 3, 1, 2)  # [N, C, H, W] view with channels-last strides


class TensorLoader:
    """Batches of a uint8 [N, 3, H, W] tensor that lives on the training device.

    batch_size is the global batch; with world_size > 1 each rank takes its contiguous share of
    every global batch, so k ranks step in lockstep over the same sample order as one process.
    train=True: reshuffle every epoch, drop the last partial batch, augment (pad/crop/flip).
    train=False: fixed order, every sample once, no augmentation (ranks split the set).
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
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {images.dtype} {images.shape}"
            )
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must divide by world size {world_size}")
        self.images, self.labels = images, labels.to(images.device)
        self.batch_size, self.preprocess, self.train = batch_size, preprocess, train
        self.seed, self.pad, self.flip = seed, pad, flip
        self.rank, self.world_size = rank, world_size
        self.channels_last, self.dtype = channels_last, dtype
        self.epoch, self.step = 0, 0

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        """Batches per epoch (train) or per pass over this rank's share (eval)."""
        if self.train:
            return len(self.labels) // self.batch_size
        lo, hi = self._eval_range()
        return -(-(hi - lo) // (self.batch_size // self.world_size))

    def _eval_range(self) -> tuple[int, int]:
        n = len(self.labels)
        per = -(-n // self.world_size)
        return min(n, self.rank * per), min(n, (self.rank + 1) * per)

    def _order(self) -> torch.Tensor:
        if not self.train:
            lo, hi = self._eval_range()
            return torch.arange(lo, hi, device=self.device)
        g = _generator(torch.device("cpu"), self.seed, self.epoch, 0xC1FA)
        return torch.randperm(len(self.labels), generator=g).to(self.device)

    def _batch(self, idx: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess.normalize(self.images[idx], dtype=self.dtype)  # [B, 3, H, W]
        if self.train:
            # One random stream per global batch (no rank in the seed); each rank takes its
            # slice of the draws, so the augmentation does not depend on the world size.
            g = _generator(self.device, self.seed, self.epoch, step, 0)
            share = self.batch_size // self.world_size
            x = pad_crop_flip(x, pad=self.pad, flip=self.flip, generator=g,
                              first=self.rank * share, total=self.batch_size)  # fmt: skip
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = x.contiguous()
        return x, self.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        if self.train:
            share = self.batch_size // self.world_size
            for step in range(self.step, len(self)):
                start = step * self.batch_size + self.rank * share
                self.step = step + 1  # position after this batch, for a checkpoint taken now
                yield self._batch(order[start : start + share], step)
            self.epoch, self.step = self.epoch + 1, 0
        else:
            share = self.batch_size // self.world_size
            for start in range(0, len(order), share):
                yield self._batch(order[start : start + share], 0)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step, self.seed = (
            int(state["epoch"]),
            int(state["step"]),
            int(state["seed"]),
        )
