"""Test error of CIFAR-10 checkpoints under several sets of test-time views (the session 38 table).

Each checkpoint's softmax is computed once per view (the image or its mirror, moved by
(dy, dx) in {-1, 0, 1}^2 with a zero or a reflected edge), then averaged over the sets below.
`flip-shift` is what `reslab eval --views flip-shift` computes; the others are for comparison.

    python results/test-views-cifar/view_variants.py --data ../shared/data RUN/last.pt ...
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from reslab.data.cifar import load_cifar
from reslab.engine.eval_run import fast_eval_model, load_checkpoint_model, normalizer
from reslab.engine.evaluator import view_probs
from reslab.runtime.precision import resolve_precision

MOVES = [(0, 0), (1, 1), (-1, -1), (1, -1), (-1, 1), (0, 1), (0, -1), (1, 0), (-1, 0)]


def moved(x: torch.Tensor, dy: int, dx: int, edge: str) -> torch.Tensor:
    """x [B, 3, H, W] moved dy rows down and dx columns right; the uncovered edge is zero or a
    reflection."""
    if (dy, dx) == (0, 0):
        return x
    p = F.pad(x, (1, 1, 1, 1), mode="constant" if edge == "zero" else "reflect")
    h, w = x.shape[-2:]
    return p[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]


def per_view(path: str, images: torch.Tensor, chunk: int = 500) -> dict:
    """{(edge, dy, dx, mirrored): softmax [N, classes]} for one checkpoint."""
    dev = torch.device("cpu")
    m = load_checkpoint_model(path, device=dev)
    model, norm = fast_eval_model(m.model.eval(), dev), normalizer(m.preprocess)
    precision = resolve_precision("auto", dev)
    out = {}
    with torch.no_grad():
        for edge in ("zero", "reflect"):
            for dy, dx in MOVES:
                if edge == "reflect" and (dy, dx) == (0, 0):
                    continue
                for mirror in (False, True):
                    parts = []
                    for i in range(0, len(images), chunk):
                        x = moved(norm(images[i : i + chunk]), dy, dx, edge)
                        x = (x.flip(-1) if mirror else x).contiguous(
                            memory_format=torch.channels_last
                        )
                        parts.append(view_probs(model, x, num_classes=None, precision=precision))
                    out[(edge, dy, dx, mirror)] = torch.cat(parts)
    return out


def view_sets(p: dict) -> dict[str, torch.Tensor]:
    def pair(edge: str, dy: int, dx: int) -> torch.Tensor:  # a view and its mirror
        return (p[(edge, dy, dx, False)] + p[(edge, dy, dx, True)]) / 2

    centre = pair("zero", 0, 0)
    sets = {"center": p[("zero", 0, 0, False)], "flip": centre}
    for edge in ("zero", "reflect"):
        diagonal = (pair(edge, 1, 1) + pair(edge, -1, -1)) / 2
        cross = sum(pair(edge, dy, dx) for dy, dx in MOVES[5:]) / 4
        corners = sum(pair(edge, dy, dx) for dy, dx in MOVES[1:5]) / 4
        tag = "" if edge == "zero" else "-reflect"
        sets[f"flip-shift{tag}"] = (centre + 2 * diagonal) / 3  # 6 views, equal weights
        sets[f"half-centre{tag}"] = (centre + diagonal) / 2  # the same 6, image pair weighted 1/2
        sets[f"cross{tag}"] = (centre + 4 * cross) / 5  # 10 views: moved 1 px along each axis
        sets[f"all-18{tag}"] = (centre + 4 * cross + 4 * corners) / 9
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data", required=True)
    args = ap.parse_args()
    test = load_cifar(args.data, dataset="cifar10", split="test")
    rows = {}
    for path in args.checkpoints:
        sets = view_sets(per_view(path, test.images))
        rows[path] = {k: 100 * (v.argmax(1) != test.labels).double().mean().item()
                      for k, v in sets.items()}  # fmt: skip
        print(path, " ".join(f"{k} {e:.2f}" for k, e in rows[path].items()), flush=True)
    names = list(next(iter(rows.values())))
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in names}
    print(f"\nmean test error (%) over {len(rows)} checkpoints, and the gain over flip:")
    for k in names:
        print(f"  {k:20s} {mean[k]:6.3f}  {mean['flip'] - mean[k]:+6.3f}")


if __name__ == "__main__":
    main()
