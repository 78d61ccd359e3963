"""AlexNet's components as ablations of a small CIFAR-10 net: LRN, overlapping pooling, dropout,
PCA colour augmentation; each switched off alone against the net with all four."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from reslab.analysis.plots import Run, plot_curves
from reslab.analysis.tables import fmt_mean_std, markdown_table, mean_std
from reslab.experiments import recipes
from reslab.experiments.recipes import Claim, Schedule, judge, verdict
from reslab.experiments.runner import Context, Plan, RunResult, RunSpec

TITLE = "AlexNet's parts, one at a time (small CIFAR-10 net)"
BUDGETS = ("smoke", "cpu", "full")
BASE = {"lrn": True, "overlap_pool": True, "dropout": 0.5, "pca_lighting": True}
# variant name -> (what changes, the paper's claimed effect of the component)
VARIANTS: dict[str, tuple[dict, str]] = {
    "all": ({}, ""),
    "no-lrn": (
        {"lrn": False},
        "LRN lowers error: ImageNet top-1 -1.4, top-5 -1.2 points; "
        "on CIFAR-10 a 4-layer CNN 13% -> 11% test error (AlexNet 3.3)",
    ),
    "no-overlap": (
        {"overlap_pool": False},
        "3x3/2 instead of 2x2/2 pooling: top-1 -0.4, top-5 "
        "-0.3 points (ImageNet), slightly harder to overfit (AlexNet 3.4)",
    ),
    "no-dropout": (
        {"dropout": 0.0},
        "without dropout the net overfits substantially (AlexNet 4.2; no number given)",
    ),
    "no-pca": (
        {"pca_lighting": False},
        "PCA colour augmentation: top-1 over -1 point (ImageNet, AlexNet 4.1)",
    ),
}
SCHEDULES = {
    "full": Schedule(30000, (15000, 22500), 1000, eval_splits=("test",)),  # ~77 epochs of 50k
    # NOTE(paper): ~2 epochs, so the five nets fit ~40 core-minutes on this CPU (LRN alone
    # costs more than the rest of the small net); test error on the first 2,000 test images.
    "cpu": Schedule(800, (400, 600), 100, eval_subset=2000, eval_splits=("test",)),
    "smoke": Schedule(
        12, (6, 9), 4, batch_size=32, train_subset=256, eval_subset=256, eval_splits=("test",)
    ),
}


def plan(ctx: Context) -> Plan:
    sched = SCHEDULES[ctx.budget]
    specs = []
    for name, (change, _) in VARIANTS.items():
        opts = {**BASE, **change}
        pca = opts.pop("pca_lighting")
        for s in range(ctx.seeds):
            cfg = recipes.alexnet_cifar_cfg(
                sched, seed=s, lr=0.01, weight_decay=5e-4, augment=True, pca_lighting=pca, **opts
            )
            specs.append(RunSpec(f"alexnet-{name}-s{s}", name, cfg, {"variant": name, "seed": s}))
    notes = [
        f"schedule: {sched.describe(val_split=False)}; lr 0.01, momentum 0.9, weight decay 5e-4 (AlexNet's); "
        "all 50k training images; pad-4 crop + flip (the CIFAR form of AlexNet's crops and "
        "reflections); per-pixel mean subtracted.",
        "net: `alexnet_cifar` (conv5x5/64, pool, LRN, conv5x5/64, LRN, pool, FC 384 + dropout, "
        "FC 10) with ReLU; `all` has LRN, 3x3/2 pooling, dropout 0.5 and PCA colour "
        "augmentation (the PCA of the CIFAR-10 training pixels); each other run turns one off.",
        "the paper's effects are for the full AlexNet on ImageNet unless stated; here they are "
        "measured on a small net on CIFAR-10.",
    ]
    notes += recipes.smoke_note(ctx.budget, "256 training images, 12 iterations")
    return Plan(specs, notes)


@dataclass(frozen=True)
class Variant:
    name: str
    test: list[float]  # final test error % per seed
    train: list[float]  # last interval's training error % per seed
    claim: Claim | None  # "the component helps" (test error rises without it); None for `all`


@dataclass
class PartsFacts:
    budget: str
    iters: int
    test_images: int
    noise: float  # one standard error of a difference between two runs' test errors, points
    variants: list[Variant]


def analyse(ctx: Context, results: Sequence[RunResult]) -> PartsFacts:
    test: dict[str, list[float]] = {}
    train: dict[str, list[float]] = {}
    for r in results:
        v = r.spec.tags["variant"]
        if r.final.get("test_error") is not None:
            test.setdefault(v, []).append(float(r.final["test_error"]))
            train.setdefault(v, []).append(float(r.final["train_error"]))
    base = mean_std(test["all"])[0] if "all" in test else None
    variants = []
    for v, (_, claim) in VARIANTS.items():
        if v not in test:
            continue
        delta = None if base is None or v == "all" else mean_std(test[v])[0] - base
        helps = (
            None
            if delta is None
            else Claim(claim, f"{delta:+.2f}", judge(delta > 0, ctx.budget, results))
        )
        variants.append(Variant(v, test[v], train[v], helps))
    n = results[0].spec.cfg.eval_subset or 10000
    p = 0.25 if base is None else base / 100
    noise = 100 * (2 * p * (1 - p) / n) ** 0.5
    return PartsFacts(ctx.budget, results[0].spec.cfg.iters, n, noise, variants)


def plot(ctx: Context, results: Sequence[RunResult], facts: PartsFacts) -> None:
    seed0 = [r for r in results if r.spec.tags["seed"] == 0 and r.rows]
    plot_curves(
        [Run(r.spec.label, r.rows) for r in seed0],
        out=ctx.out / "alexnet_parts.png",
        title="AlexNet parts on CIFAR-10",
    )


def render(f: PartsFacts) -> str:
    """The report's markdown from the facts."""
    rows = [
        [v.name, fmt_mean_std(v.test), fmt_mean_std(v.train)]
        + (["", "", VARIANTS[v.name][1]] if v.claim is None
           else [v.claim.ours, verdict(v.claim.answer), v.claim.claim])
        for v in f.variants
    ]  # fmt: skip
    lines = [
        markdown_table(
            [
                "run",
                "test err %",
                "train err % (last interval)",
                "test err change when removed",
                "component helps",
                "paper's claim",
            ],
            rows,
            align="lrrrcl",
        ),
        "",
        "![curves](alexnet_parts.png)",
        "",
        f"Test error is measured on {f.test_images:,} test images: the sampling noise of a "
        f"difference between two runs is about ±{f.noise:.1f} points (one standard error), "
        "before seed noise; smaller changes are not evidence either way.",
    ]
    if f.budget != "full":
        lines += [
            "",
            f"At the `{f.budget}` budget ({f.iters:,} "
            "iterations) regularisers (dropout, PCA colour, overlapping pooling) usually "
            "cost accuracy: they pay off when a net trains long enough to overfit, which "
            "these runs do not. That disagreement with the paper is expected here.",
        ]
    return "\n".join(lines)
