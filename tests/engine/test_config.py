from __future__ import annotations

import pytest
import yaml

from reslab.engine.config import TrainConfig, list_recipes, load_recipe


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
    i = load_recipe("imagenet-paper")
    assert (i.batch_size, i.iters, i.lr) == (256, 600000, 0.1)


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
    with pytest.raises(FileNotFoundError, match="cifar10-paper"):
        load_recipe("nope")
    assert TrainConfig.from_dict(c.to_dict()) == c
