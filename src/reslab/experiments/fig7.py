"""Figure 7: standard deviation of the 3x3 layers' responses of trained plain nets and ResNets."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reslab.analysis.responses import layer_response_std, plot_responses
from reslab.analysis.tables import markdown_table
from reslab.data.cifar import load_cifar
from reslab.data.preprocess import Preprocess
from reslab.experiments import recipes
from reslab.experiments.recipes import Claim, judge
from reslab.experiments.runner import Context, Plan, RunResult, RunSpec
from reslab.models import create_model
from reslab.runtime.checkpoint import load_checkpoint
from reslab.runtime.distributed import resolve_device

TITLE = "Figure 7: layer responses of plain nets and ResNets (CIFAR-10)"
PLAIN = {"full": (20, 56), "cpu": (20, 56), "cpu-long": (20, 56), "smoke": (20, 32)}
RESNET = {"full": (20, 56, 110), "cpu": (20, 56), "cpu-long": (20, 56), "smoke": (20, 32)}
BUDGETS = tuple(RESNET)
# Test images the responses are measured on (eval mode, BN with its running statistics).
IMAGES = {"full": 10000, "cpu": 1000, "cpu-long": 1000, "smoke": 256}


def plan(ctx: Context) -> Plan:
    sched = recipes.RESNET[ctx.budget]
    specs = []
    for kind, depths in (("plain", PLAIN[ctx.budget]), ("resnet", RESNET[ctx.budget])):
        for d in depths:
            cfg = recipes.cifar_resnet_cfg(f"{kind}{d}", sched, seed=0)
            label = f"{'plain' if kind == 'plain' else 'ResNet'}-{d}"
            specs.append(RunSpec(f"{kind}{d}-s0", label, cfg, {"kind": kind, "depth": d}))
    notes = [
        f"schedule: {sched.describe()}.",
        f"paper: {recipes.PAPER_RESNET_SCHEDULE}.",
        f"responses measured on the first {IMAGES[ctx.budget]:,} test images, seed 0 only; "
        "the std pools all N x C x H x W values of a layer's output.",
    ]
    if ctx.budget in ("cpu", "cpu-long"):
        notes.append(
            f"`{ctx.budget}` budget: ResNet-110 left out (the paper's Figure 7 includes it; "
            "`full` does)."
        )
    notes += recipes.smoke_note(ctx.budget, "depths 20 and 32")
    return Plan(specs, notes)


def responses(res: RunResult, *, images: torch.Tensor, device: torch.device) -> list[float]:
    """Std of every 3x3 layer's response (after BN) of the run's final model, in layer order."""
    ckpt = load_checkpoint(res.run_dir / "last.pt", map_location=device)
    model = create_model(ckpt["model_name"], **ckpt["model_options"]).to(device)
    model.load_state_dict(ckpt["model"])
    pre = Preprocess.from_dict(ckpt["preprocess"])
    batches = (pre.normalize(images[i : i + 500].to(device)) for i in range(0, len(images), 500))
    return list(layer_response_std(model, batches, device=device).values())


@dataclass
class Fig7Facts:
    budget: str
    iters: int
    stds: dict[str, list[float]]  # model label -> std of each 3x3 layer's response, in order
    claims: list[Claim]  # ResNet-d below plain-d; each deeper ResNet below the shallower

    @property
    def mean(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.stds.items()}


def analyse(ctx: Context, results: Sequence[RunResult]) -> Fig7Facts:
    device = resolve_device(ctx.device)
    images = load_cifar(ctx.data, dataset="cifar10", split="test").images[: IMAGES[ctx.budget]]
    iters = results[0].spec.cfg.iters
    # A run that diverged before its first checkpoint has no model to measure.
    results = [r for r in results if (r.run_dir / "last.pt").is_file()]
    facts = Fig7Facts(ctx.budget, iters, {}, [])
    facts.stds = {r.spec.label: responses(r, images=images, device=device) for r in results}
    mean = facts.mean

    def claim(a: str, b: str) -> Claim:
        ours = f"{mean[a]:.3f} vs {mean[b]:.3f}"
        return Claim(
            f"{a} responds less than {b}", ours, judge(mean[a] < mean[b], ctx.budget, results)
        )

    for d in sorted({r.spec.tags["depth"] for r in results}):
        if f"plain-{d}" in mean and f"ResNet-{d}" in mean:
            facts.claims.append(claim(f"ResNet-{d}", f"plain-{d}"))
    res = sorted(
        (r.spec.tags["depth"], r.spec.label) for r in results if r.spec.tags["kind"] == "resnet"
    )
    facts.claims += [claim(b, a) for (_, a), (_, b) in itertools.pairwise(res)]
    return facts


def plot(ctx: Context, results: Sequence[RunResult], facts: Fig7Facts) -> None:
    plot_responses(
        facts.stds,
        out=ctx.out / "fig7.png",
        title=f"std of 3x3 layer responses (CIFAR-10, {ctx.budget} budget)",
    )


def render(f: Fig7Facts) -> str:
    """The report's markdown from the facts."""
    mean = f.mean
    rows = [[k, len(v), f"{mean[k]:.3f}", f"{max(v):.3f}", f"{min(v):.3f}"]
            for k, v in f.stds.items()]  # fmt: skip
    lines = [
        "![Figure 7](fig7.png)",
        "",
        "Top: std by the layer's original position; bottom: the same values sorted.",
        "",
        markdown_table(["model", "3x3 layers", "mean std", "max", "min"], rows),
        "",
        "### Do the paper's claims hold here?",
        "",
        "Paper: ResNets have generally smaller responses than their plain counterparts, and "
        "deeper ResNets smaller still (each residual function is closer to zero).",
        "",
        markdown_table(
            ["claim", "ours (mean std over layers)", "holds"],
            [c.row() for c in f.claims],
            align="lll",
        ),
    ]
    if f.budget != "full":
        lines += [
            "",
            f"At the `{f.budget}` budget the nets are briefly trained "
            f"({f.iters:,} of the paper's 64,000 iterations); the "
            "responses of barely trained nets are closer to those at initialisation, "
            "so the differences can be smaller than the paper's or reversed.",
        ]
    return "\n".join(lines)
