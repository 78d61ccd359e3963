"""InferenceModel: the fast path gives the model's numbers (fp32 exactly, bf16 closely)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reslab
from reslab.engine.evaluator import evaluate
from reslab.inference import InferenceModel
from reslab.runtime import precision as P
from reslab.runtime.precision import bf16_is_fast, resolve_precision


def _calibrated_resnet20(images: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = reslab.create_model("resnet20")
    x = images.float() / 255 - 0.5
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval(), x


def test_backends_and_precisions_match_eager_fp32(cifar_test_images) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    images, _ = cifar_test_images
    model, x = _calibrated_resnet20(images)
    with torch.no_grad():
        want = model(x)
    fp32 = InferenceModel(copy.deepcopy(model), precision="fp32")
    torch.testing.assert_close(fp32(x), want, atol=1e-4, rtol=1e-4)
    ort = InferenceModel(copy.deepcopy(model), backend="onnxruntime", input_size=32)
    torch.testing.assert_close(ort(x[:5]), want[:5], atol=1e-4, rtol=1e-4)
    bf16 = InferenceModel(copy.deepcopy(model), precision="bf16")
    got = bf16(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() < 0.05  # bf16 keeps ~3 significant digits


def test_precision_and_backend_validation() -> None:
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if bf16_is_fast(cpu) else "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", torch.device("cpu"))
    model = reslab.create_model("resnet20")
    with pytest.raises(ValueError, match="backend must be one of"):
        InferenceModel(model, backend="tensorrt")
    with pytest.raises(ValueError, match="needs input_size"):
        InferenceModel(model, backend="onnxruntime")


def test_auto_means_what_it_means_in_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """One policy: predict resolves `auto` by the trainer's own rule, fp16 on an older GPU."""
    monkeypatch.setattr(P, "cuda_bf16_native", lambda device=None: False)
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    model = reslab.create_model("resnet20")
    for fast in (True, False):
        monkeypatch.setattr(P, "bf16_is_fast", lambda device, fast=fast: fast)
        want = "bf16" if fast else "fp32"
        assert resolve_precision("auto", torch.device("cpu")) == want
        assert InferenceModel(model, precision="auto").precision == want


def test_evaluation_checks_the_precision_once_before_any_batch() -> None:
    def batches():
        raise AssertionError("a bad precision must be refused before the first batch")
        yield

    with pytest.raises(ValueError, match="precision must be one of"):
        evaluate(reslab.create_model("resnet20"), batches(), device="cpu", precision="fp8")


@pytest.mark.parametrize(
    ("name", "options", "size"),
    [("resnet20", {}, 32), ("plain20", {}, 32), ("resnet32", {"shortcut": "B"}, 32),
     ("resnet18", {"shortcut": "C"}, 64), ("resnet50", {}, 64)],
)  # fmt: skip
def test_folded_batchnorm_gives_the_same_logits(name: str, options: dict, size: int) -> None:
    """Folding BN into the convolutions (the default fast path) changes no logit beyond float
    rounding, for every block type and shortcut option, and leaves no BatchNorm behind."""
    from reslab.inference import fold_batchnorm

    torch.manual_seed(0)
    model = reslab.create_model(name, **options)
    for m in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    model.eval()
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        want = model(x)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is intact
    with torch.no_grad():
        got = folded(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        InferenceModel(model, precision="fp32")(x), want, atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(("name", "size", "batch"), [("resnet20", 32, 1), ("resnet20", 32, 40),
                                                     ("resnet18", 64, 2)])  # fmt: skip
def test_bf16_weights_cast_once_give_autocasts_logits_to_the_bit(
    name: str, size: int, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU the bf16 path stores conv and linear weights in bf16 once (autocast had cast
    them on every call): the same rounding, so the same logits as autocast over the fp32
    folded model, through eager ops (1-2 images), reslab's eval kernel (40) and oneDNN's fused
    convolutions; biases stay fp32 (the kernel adds them unrounded). (Packed weights off: they
    take the few-image calls to the fused op, whose rounding differs from the eager ops';
    tests/models/test_fused_eval.py checks them against it.)"""
    from reslab.inference import fold_batchnorm
    from reslab.models import fused_eval

    monkeypatch.setattr(fused_eval, "PACK", False)

    torch.manual_seed(0)
    model = reslab.create_model(name).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    runner = InferenceModel(model, precision="bf16")
    convs = [m for m in runner.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(m.weight.dtype == torch.bfloat16 for m in convs)
    assert all(m.bias is None or m.bias.dtype == torch.float32 for m in convs)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the caller's untouched
    ref = fold_batchnorm(model).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode(), P.autocast("bf16", torch.device("cpu")):
        want = ref(x.contiguous(memory_format=torch.channels_last)).float()
    assert torch.equal(runner(x), want)


def test_evaluations_cast_bf16_weights_once_and_score_the_same() -> None:
    """`reslab eval` and a run's evaluations (eval_run.fast_eval_model) store the weights in
    bf16 once when the CPU evaluates in bf16: the same softmax scores to the bit; fp32 keeps
    fp32 weights."""
    from reslab.engine.eval_run import fast_eval_model
    from reslab.engine.evaluator import view_probs

    torch.manual_seed(0)
    net = reslab.create_model("resnet20").eval()
    cpu = torch.device("cpu")
    once, per_call = fast_eval_model(net, cpu, "bf16"), fast_eval_model(net, cpu)
    assert once.conv1.weight.dtype == torch.bfloat16 and once.fc.weight.dtype == torch.bfloat16
    assert per_call.conv1.weight.dtype == torch.float32
    assert fast_eval_model(net, cpu, "fp32").conv1.weight.dtype == torch.float32
    x = torch.randn(40, 3, 32, 32)
    with torch.inference_mode():
        a, b = (view_probs(m, x, num_classes=10, precision="bf16") for m in (once, per_call))
    assert torch.equal(a, b)


def test_inputs_a_user_may_pass_are_taken_or_refused_in_one_line() -> None:
    """fp16/bf16/fp64 images run (fp64 had failed at every precision, fp16/bf16 at fp32); a
    bf16 model at fp32 runs in fp32; integers, NHWC-less shapes, numpy arrays and a CUDA device
    this machine lacks are one line saying what to pass (helper audit C, M1-M3)."""
    torch.manual_seed(0)
    net = reslab.create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    want = InferenceModel(net, precision="fp32")(x)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        got = InferenceModel(net, precision="fp32")(x.to(dtype))
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    assert InferenceModel(net, precision="bf16")(x.double()).shape == (2, 10)
    half = InferenceModel(copy.deepcopy(net).to(torch.bfloat16), precision="fp32")
    assert half.model.conv1.weight.dtype == torch.float32 and half(x).shape == (2, 10)
    runner = InferenceModel(net, precision="fp32")
    with pytest.raises(TypeError, match=r"runs classifiers .* returns a dict: call it directly"):
        InferenceModel(reslab.features(net, layers=["layer1"]), precision="fp32")(x)
    with pytest.raises(TypeError, match="normalise them first"):
        runner(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"\[N, C, H, W\]; got a \(3, 32, 32\) tensor"):
        runner(x[0])
    with pytest.raises(TypeError, match=r"\[N, C, H, W\]; got ndarray"):
        runner(x.numpy())
    if not torch.cuda.is_available():
        from reslab.errors import UserError

        with pytest.raises(UserError, match="torch sees no CUDA device"):
            InferenceModel(net, device="cuda")


def test_a_batchnorm_without_running_statistics_is_left_unfolded() -> None:
    """track_running_stats=False normalises by each batch's statistics even in eval mode: no
    fixed convolution equals it, so fold_batchnorm keeps it (it had failed inside torch's fuse
    with an AssertionError; helper audit C, M13)."""
    from reslab.inference import fold_batchnorm

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    folded = fold_batchnorm(net)
    assert isinstance(folded[1], nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(folded(x), net.eval()(x))


def test_hooks_on_a_batchnorm_or_its_conv_still_run_in_the_folded_copy() -> None:
    """A hook the user put on a block's bn1 (or conv1) sees what it was registered for in
    fold_batchnorm's copy, whose other pairs are folded; it had been replaced by an Identity
    that never ran the hook (helper audit C's note)."""
    from reslab.inference import fold_batchnorm
    from reslab.models import create_model

    net = create_model("resnet20").eval()
    seen: list[tuple[int, ...]] = []
    net.layer1[0].bn1.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    net.layer2[0].conv2.register_forward_pre_hook(lambda m, i: seen.append(tuple(i[0].shape)))
    folded = fold_batchnorm(net)
    assert isinstance(folded.layer1[0].bn1, nn.BatchNorm2d)  # kept, with its hook
    assert isinstance(folded.layer2[0].bn2, nn.BatchNorm2d)  # its conv has a hook: kept
    assert isinstance(folded.layer1[0].bn2, nn.Identity)  # the rest folded
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)
    assert seen == [(2, 16, 32, 32), (2, 32, 16, 16)] * 2  # the copy's calls, then net's


def test_inference_model_packs_conv_weights_in_bf16_on_the_cpu_only() -> None:
    from reslab.models import create_model, fused_eval

    net = create_model("resnet20").eval()
    bf16 = InferenceModel(net, precision="bf16")
    fp32 = InferenceModel(net, precision="fp32")
    assert bf16.model.conv1 in fused_eval._PACKED and fp32.model.conv1 not in fused_eval._PACKED
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(bf16(x), fp32(x), rtol=0.05, atol=0.05 * fp32(x).abs().max().item())


def test_inference_model_runs_large_cpu_batches_in_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    from reslab.engine import evaluator
    from reslab.models import create_model

    torch.manual_seed(0)
    runner = InferenceModel(create_model("resnet20").eval(), precision="fp32")
    x = torch.randn(9, 3, 32, 32)
    whole = runner(x)
    passes: list[int] = []
    handle = runner.model.register_forward_pre_hook(lambda m, args: passes.append(len(args[0])))
    monkeypatch.setattr(evaluator, "FORWARD_ELEMENTS", 4 * 3 * 32 * 32)
    parts = runner(x)
    handle.remove()
    assert passes == [4, 4, 1] and parts.shape == (9, 10) and parts.dtype == torch.float32
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)
    # a model returning something other than logits is still refused in one line
    feats = InferenceModel(nn.Sequential(nn.Flatten(), _Dict()), precision="fp32", fold_bn=False)
    with pytest.raises(TypeError, match="runs classifiers"):
        feats(x)


class _Dict(nn.Module):
    def forward(self, x: torch.Tensor) -> dict:
        return {"out": x}
