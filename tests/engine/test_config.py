from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from reslab.engine.config import CONFIG_DIR, TrainConfig, list_recipes, load_recipe


def test_recipes_ship_and_match_the_paper() -> None:
    assert {
        "cifar10-paper",
        "cifar10-paper-110",
        "imagenet-paper",
        "alexnet",
        "cifar10-fast",
    } <= set(list_recipes())
    c = load_recipe("cifar10-paper")
    assert (c.batch_size, c.lr, c.momentum, c.weight_decay) == (128, 0.1, 0.9, 1e-4)
    assert (c.milestones, c.iters, c.val_split) == ([32000, 48000], 64000, True)
    r110 = load_recipe("cifar10-paper-110")
    assert (r110.warmup_lr, r110.warmup_until_error, r110.model) == (0.01, 80.0, "resnet110")
    # otherwise section 4.2's recipe: batch 128, lr 0.1 /10 at 32k and 48k, stop at 64k, ...
    for r in (c, r110):
        assert (r.batch_size, r.lr, r.momentum, r.gamma) == (128, 0.1, 0.9, 0.1)
        assert r.weight_decay == 1e-4
        assert (r.milestones, r.iters, r.val_split) == ([32000, 48000], 64000, True)
        assert (r.pad, r.flip, r.normalization, r.eval_views) == (4, True, "per_pixel", "center")
        assert (r.schedule, r.warmup_iters, r.nesterov, r.label_smoothing) == ("step", 0, False, 0)
    i = load_recipe("imagenet-paper")
    assert (i.batch_size, i.iters, i.lr) == (256, 600000, 0.1)


def test_progressive_recipe_is_cifar10_fast_plus_the_measured_resizing() -> None:
    # The README's time-to-accuracy rows ran `--recipe cifar10-fast --epochs 31 --set
    # small_size=24 --set small_until=0.8 --eval-every 100000`; this recipe must stay that run
    # (since session 38 tested on flip-shift's 6 views; the training is the same).
    fast, prog = load_recipe("cifar10-fast"), load_recipe("cifar10-progressive")
    measured = fast.override(["epochs=31", "small_size=24", "small_until=0.8",
                              "eval_every=100000", "eval_views=flip-shift"])  # fmt: skip
    assert replace(prog, iters=fast.iters) == measured  # `epochs` sets the iterations
    text = yaml.safe_load((CONFIG_DIR / "cifar10-progressive.yaml").read_text())["description"]
    assert text.startswith("NOT the paper's")


def test_round_trip_and_overrides(tmp_path) -> None:
    c = load_recipe("cifar10-paper").override(
        ["lr=0.05", "milestones=[10, 20]", "model_options.shortcut=B", "val_split=false"]
    )
    assert (c.lr, c.milestones, c.model_options, c.val_split) == (
        0.05,
        [10, 20],
        {"shortcut": "B"},
        False,
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(c.to_dict()))
    assert load_recipe(str(path)) == c
    with pytest.raises(ValueError, match="unknown config field"):
        c.override(["learning_rate=1"])
    with pytest.raises(ValueError, match="eval_views must be one of"):
        c.override(["eval_views=mirror"])
    assert c.override(["eval_views=flip", "alternate_flip=true"]).eval_views == "flip"
    assert c.override(["eval_views=flip-shift"]).eval_views == "flip-shift"
    assert c.override(["small_size=24", "small_until=0.6"]).small_size == 24
    for bad, msg in [("small_size=40", "small_size must be"), ("small_size=24.5", "small_size"),
                     ("small_until=1.0", "small_until must be in")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            c.override([bad])
    with pytest.raises(ValueError, match="CIFAR data sets only"):
        c.override(["dataset=folder", "small_size=24"])
    with pytest.raises(FileNotFoundError, match="cifar10-paper"):
        load_recipe("nope")
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_epochs_become_the_same_iterations_fused_and_alone(cifar_root, tmp_path) -> None:
    """One rule (run_length.iters_from_epochs): 1 epoch of 64 images at batch 16 is 4
    iterations, and milestone 4 of the config's 6 iterations moves to 3, for both trainers."""
    from reslab.engine.fused_trainer import train_fused
    from reslab.engine.trainer import train
    from reslab.runtime.checkpoint import load_checkpoint

    def cfg(out: str, seed: int) -> TrainConfig:
        return TrainConfig(model="resnet20", data=str(cifar_root), out=str(tmp_path / out),
                           device="cpu", precision="fp32", val_split=False, train_subset=64,
                           eval_subset=16, eval_splits=["test"], batch_size=16, iters=6,
                           epochs=1, milestones=[4], seed=seed)  # fmt: skip

    train_fused([cfg("f0", 0), cfg("f1", 1)], progress=False)
    train(cfg("alone", 0), progress=False)
    for out in ("f0", "f1", "alone"):
        ckpt = load_checkpoint(tmp_path / out / "last.pt")
        assert (ckpt["step"], ckpt["config"]["iters"], ckpt["config"]["milestones"]) == (4, 4, [3])


def test_run_info_names_the_cpu_kind() -> None:
    """Every record says which bf16 path the CPU has: Intel AMX, AVX-512 bf16 (AMD Zen 4) or none."""
    import re

    from reslab.engine.trainer import run_info

    isa = run_info()["cpu_isa"]
    assert re.fullmatch(
        r"[A-Z0-9_]+ \((amx_bf16, avx512_bf16|amx_bf16|avx512_bf16|no native bf16)\)", isa
    ), isa


def test_model_options_of_the_wrong_type_are_refused_naming_the_recipe(tmp_path) -> None:
    """A builder takes any non-empty string as true: `residual: "no"` trained a residual net."""
    from reslab.engine.config import ConfigError

    path = tmp_path / "r.yaml"
    path.write_text('model: plain20\nmodel_options: {residual: "yes"}\n')
    with pytest.raises(ConfigError, match=r"^recipe .*r\.yaml: model_options\.residual must be "
                       r"true or false, got 'yes'$"):  # fmt: skip
        load_recipe(str(path))
    # An option no model takes, or a class count none can have: named with the recipe (at
    # build time the line could not say where the option came from).
    path.write_text("model: resnet20\nmodel_options: {widen: 2}\n")
    with pytest.raises(ConfigError, match=r"^recipe .*r\.yaml: model_options\.widen: no model "
                       r"takes this option; the models' options are \[.*'shortcut'"):  # fmt: skip
        load_recipe(str(path))
    path.write_text("model: resnet20\nmodel_options: {num_classes: 0}\n")
    with pytest.raises(ConfigError, match=r"^recipe .*r\.yaml: model_options\.num_classes must"):
        load_recipe(str(path))
    path.write_text("model: plain20\nmodel_options: {residual: false, zero_init_residual: yes}\n")
    assert load_recipe(str(path)).model_options == {"residual": False, "zero_init_residual": True}
    c = TrainConfig()
    with pytest.raises(ConfigError, match=r"model_options\.stride_in_3x3 must be true or false"):
        c.override(["model_options.stride_in_3x3=maybe"])
    with pytest.raises(ConfigError, match=r"model_options\.dropout must be a number, got 'x'"):
        c.override(["model_options.dropout=x"])
    assert c.override(["model_options.dropout=0"]).model_options == {"dropout": 0}


def test_a_float_option_written_without_a_dot_is_a_number(tmp_path) -> None:
    """YAML 1.1 reads 5e-1 as the string "5e-1"; a float option takes it as 0.5, as the config's
    own float fields do (`lr: 1e-3`), in --set and in recipes; a word is still refused."""
    from reslab.engine.config import ConfigError

    c = TrainConfig(model="alexnet")
    assert c.override(["model_options.dropout=5e-1"]).model_options == {"dropout": 0.5}
    path = tmp_path / "r.yaml"
    path.write_text("model: alexnet\nmodel_options: {dropout: 25E-2, lrn: true}\n")
    assert load_recipe(str(path)).model_options == {"dropout": 0.25, "lrn": True}
    with pytest.raises(ConfigError, match=r"model_options\.dropout must be a number, got 'half'"):
        c.override(["model_options.dropout=half"])
    with pytest.raises(ConfigError, match=r"model_options\.dropout must be a number, got 'nan'"):
        c.override(["model_options.dropout=nan"])  # not taken as a number here either
    # a string option stays a string even when it reads as a number
    assert c.override(["model_options.shortcut=1e0"]).model_options == {"shortcut": "1e0"}


def test_yaml_merge_keys_still_read_and_repeats_beside_them_are_refused() -> None:
    """The duplicate-key check must not break `<<:` merges (explicit keys override merged)."""
    from reslab.runtime.yaml_file import YamlDuplicateKeyError, loads_yaml

    assert loads_yaml("c: {<<: {b: 2, d: 5}, b: 3}", label="t") == {"c": {"b": 3, "d": 5}}
    with pytest.raises(YamlDuplicateKeyError, match="'b' is given twice"):
        loads_yaml("c: {<<: {b: 2}, b: 3, b: 4}", label="t")


def test_a_config_built_in_python_names_a_field_of_the_wrong_type() -> None:
    """TrainConfig(...) is not coerced as from_dict is: lr="0.1" and out=None had ended in
    TypeErrors naming neither field (helper audit C, M11)."""
    from reslab.engine.config import ConfigError

    for kw, needle in (({"lr": "0.1"}, "lr must be a number > 0, got '0.1'"),
                       ({"weight_decay": None}, "weight_decay must be >= 0, got None"),
                       ({"out": None}, "out must name the run's folder, got None"),
                       ({"out": ""}, "out must name the run's folder, got ''")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(needle)):
            TrainConfig(**kw).validate()
    TrainConfig(lr=1, out=Path("runs/x")).validate()  # an int lr and a Path are fine
