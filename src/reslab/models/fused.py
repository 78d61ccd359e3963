"""K independent CIFAR nets (section 4.2) as one net: K times the channels, every conv groups=K.

Member k's batch of N images sits in input channels 3k..3k+2 of an [N, 3K, H, W] tensor, so
each channel group sees only its own member's images: every BatchNorm channel normalises over
that member's N x H x W values, exactly the statistics of the separate net. Option-A shortcuts
pad within each group; the classifier is one batched matmul over [K, classes, C].

The parameters stay the members' own: `members[k]` is an ordinary CifarResNet whose weights are
concatenated into grouped weights at every forward (a copy of ~0.3M floats per member for
ResNet-20, against ~5 GFLOP of convolutions per batch), so gradients land on each member's own
leaf tensors. Each member therefore keeps its own optimizer (own learning rate: the ResNet-110
warm-up switch is per member) and its own state_dict in the single-net layout. BatchNorm running
statistics live in fused buffers; the members' buffers are views into them, so member k's
state_dict always holds its current statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from reslab.models.blocks import BasicBlock
from reslab.models.cifar import CifarResNet
from reslab.models.layers import PadShortcut, subsample_pad

SHORTCUTS = ("A", "B", "C")  # all three options of section 3.3 are supported


def stack_inputs(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """K member batches [N, 3, H, W] -> [N, 3K, H, W] (member k in channels 3k..3k+2)."""
    return torch.cat(list(xs), dim=1)


def fuse_state_dicts(sds: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """K single-net state_dicts -> one fused state_dict: every tensor stacked to [K, ...].

    The grouped conv weight of a layer is its stacked tensor reshaped to [K*out, in, kh, kw]."""
    keys = list(sds[0])
    for i, sd in enumerate(sds[1:], 1):
        if list(sd) != keys or any(sd[k].shape != sds[0][k].shape for k in keys):
            raise ValueError(f"member {i}'s state_dict has another layout than member 0's")
    return {k: torch.stack([sd[k] for sd in sds]) for k in keys}


def split_state_dict(fused: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The inverse of fuse_state_dicts: one ordinary single-net state_dict per member."""
    k = len(next(iter(fused.values())))
    return [{name: t[i].clone() for name, t in fused.items()} for i in range(k)]


class FusedCifarNet(nn.Module):
    """K CifarResNets (ResNets or plain twins, shortcut A/B/C) run as one grouped net.

    forward: [N, 3K, H, W] (see stack_inputs) -> logits [K, N, classes].
    """

    def __init__(self, members: Sequence[CifarResNet]) -> None:
        super().__init__()
        if len(members) < 1:
            raise ValueError("a fused net needs at least one member")
        ref = members[0].state_dict()
        for i, m in enumerate(members):
            if not isinstance(m, CifarResNet):
                raise TypeError(f"member {i} is a {type(m).__name__}, not a CifarResNet")
            sd = m.state_dict()
            if list(sd) != list(ref) or any(sd[k].shape != ref[k].shape for k in ref):
                raise ValueError(f"member {i} has another architecture than member 0")
        self.k = len(members)
        self.members = nn.ModuleList(members)
        self._bn_paths = [n for n, m in members[0].named_modules() if isinstance(m, nn.BatchNorm2d)]
        for i, path in enumerate(self._bn_paths):
            bns = [m.get_submodule(path) for m in members]
            # Non-persistent: the members' state_dicts (views into these) are the saved form.
            self.register_buffer(f"_mean{i}", torch.cat([b.running_mean for b in bns]), False)
            self.register_buffer(f"_var{i}", torch.cat([b.running_var for b in bns]), False)
        # Every BN of every member counts the same training batches: one shared counter.
        self.register_buffer("_batches", members[0].bn1.num_batches_tracked.clone(), False)
        self._link()

    def _link(self) -> None:
        """Point every member BN's running statistics at its slice of the fused buffers."""
        for i, path in enumerate(self._bn_paths):
            mean, var = getattr(self, f"_mean{i}"), getattr(self, f"_var{i}")
            c = len(mean) // self.k
            for k, m in enumerate(self.members):
                bn = m.get_submodule(path)
                bn.running_mean = mean[k * c : (k + 1) * c]
                bn.running_var = var[k * c : (k + 1) * c]
                bn.num_batches_tracked = self._batches

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .to()/.cuda() replace every tensor, which would cut the members' views loose.
        out = super()._apply(fn, recurse)
        self._link()
        return out

    # --- fused layers --------------------------------------------------------------------------
    def _conv(self, convs: list[nn.Conv2d], x: torch.Tensor) -> torch.Tensor:
        c = convs[0]
        w = torch.cat([m.weight for m in convs])  # [K*out, in, kh, kw]
        return F.conv2d(x, w, None, c.stride, c.padding, c.dilation, self.k * c.groups)

    def _bn(self, bns: list[nn.BatchNorm2d], i: int, x: torch.Tensor) -> torch.Tensor:
        b = bns[0]
        return F.batch_norm(
            x, getattr(self, f"_mean{i}"), getattr(self, f"_var{i}"),
            torch.cat([m.weight for m in bns]), torch.cat([m.bias for m in bns]),
            self.training, b.momentum, b.eps,
        )  # fmt: skip

    def _pad(self, sc: PadShortcut, x: torch.Tensor) -> torch.Tensor:
        """Option A within each member's channel group: [N, K*C, H, W] -> [N, K*C', H/s, W/s]."""
        return subsample_pad(x, sc.stride, *sc.pad, groups=self.k, training=self.training)

    def _block(self, blocks: list[BasicBlock], bn_index: dict[str, int], path: str,
               x: torch.Tensor) -> torch.Tensor:  # fmt: skip
        def bns(name: str) -> tuple[list[nn.BatchNorm2d], int]:
            return [b.get_submodule(name) for b in blocks], bn_index[f"{path}.{name}"]

        b0 = blocks[0]
        out = F.relu(self._bn(*bns("bn1"), self._conv([b.conv1 for b in blocks], x)))
        out = self._bn(*bns("bn2"), self._conv([b.conv2 for b in blocks], out))
        if b0.residual:
            sc = b0.downsample
            if sc is None:
                short = x
            elif isinstance(sc, PadShortcut):
                short = self._pad(sc, x)
            else:  # option B/C: 1x1 projection + BN, grouped like every other conv
                short = self._conv([b.downsample[0] for b in blocks], x)
                short = self._bn(*bns("downsample.1"), short)
            out = out + short
        return F.relu(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ms = list(self.members)
        if x.dim() != 4 or x.shape[1] != 3 * self.k:
            raise ValueError(f"expected [N, {3 * self.k}, H, W] (stack_inputs), got {x.shape}")
        idx = {p: i for i, p in enumerate(self._bn_paths)}
        if self.training:
            self._batches.add_(1)  # what each member BN's own counter does in its forward
        x = F.relu(self._bn([m.bn1 for m in ms], idx["bn1"], self._conv([m.conv1 for m in ms], x)))
        for stage in ("layer1", "layer2", "layer3"):
            for j in range(len(ms[0].get_submodule(stage))):
                path = f"{stage}.{j}"
                x = self._block([m.get_submodule(path) for m in ms], idx, path, x)
        n = x.shape[0]
        feats = x.mean((2, 3)).view(n, self.k, -1).transpose(0, 1)  # [K, N, C]
        w = torch.stack([m.fc.weight for m in ms])  # [K, classes, C]
        b = torch.stack([m.fc.bias for m in ms])  # [K, classes]
        return torch.baddbmm(b[:, None, :], feats, w.transpose(1, 2))  # [K, N, classes]

    def member_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Each member's weights and BN statistics as an ordinary single-net state_dict (copies)."""
        return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.members]

    def load_member_state_dicts(self, sds: Sequence[dict[str, torch.Tensor]]) -> None:
        if len(sds) != self.k:
            raise ValueError(f"{len(sds)} state_dicts for a fused net of {self.k} members")
        for m, sd in zip(self.members, sds, strict=True):
            m.load_state_dict(sd)  # copies in place: the BN buffers stay views of the fused ones
