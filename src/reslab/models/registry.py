"""Name -> builder registry. Variants are keyword options of one builder, never copies."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: listing names must not import torch
    from torch import nn

from reslab.errors import UserError

MAX_CLASSES = 100_000  # far above ImageNet-21k's 21,841: refused before a classifier is allocated
# Image sides a run, a stats scan or a weights file may ask for: 4096 is 18x the paper's 224
# crop; beyond these a typo (image_size: 100000) is a terabyte-sized first batch.
MAX_INPUT_SIZE = 4096
MAX_RESIZE = 8192


class UnknownModelError(UserError, KeyError):
    """A model name that is not registered (still a KeyError, for callers that catch that)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ModelOptionError(UserError):
    """Model options (e.g. from a weights file's metadata) that the builder does not take."""


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model besides how to build it."""

    name: str
    builder: Callable[..., nn.Module]
    family: str  # "imagenet" | "cifar" | "alexnet"
    depth: int  # weighted layers, as the paper counts them
    input_size: int  # native square input side in pixels
    defaults: dict[str, Any] = field(default_factory=dict)  # options the name fixes
    paper_params: float | None = None  # Table 6 (CIFAR), in parameters
    paper_macs: float | None = None  # Table 1 (ImageNet), multiply-adds
    paper_error: float | None = None  # top-1 error %: Tables 2-3 (ImageNet, 10-crop) or Table 6


_REGISTRY: dict[str, ModelInfo] = {}


def classifier_name(model: nn.Module) -> str:
    """The attribute that holds `model`'s classifier, as its class declares it (`classifier_name`,
    like timm's get_classifier): the one rule for head re-init, head_lr_mult and freeze_backbone."""
    name = getattr(model, "classifier_name", None)
    if not isinstance(name, str):
        raise ValueError(f"{type(model).__name__} does not say which layer is its classifier; "
                         "give its class a classifier_name attribute")  # fmt: skip
    return name


def get_classifier(model: nn.Module) -> nn.Module:
    return model.get_submodule(classifier_name(model))


def register_model(info: ModelInfo) -> ModelInfo:
    if info.name in _REGISTRY:
        raise ValueError(f"model {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def model_info(name: str) -> ModelInfo:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; `reslab models` lists them: {', '.join(list_models())}"
        ) from None


def list_models(family: str | None = None) -> list[str]:
    _ensure_loaded()
    return [n for n, i in _REGISTRY.items() if family is None or i.family == family]


def create_model(name: str, **options: Any) -> nn.Module:
    """Build a registered model; `options` override the name's defaults.

    >>> create_model("resnet34", shortcut="A")  # doctest: +SKIP
    >>> create_model("resnet34", residual=False)  # its plain twin  # doctest: +SKIP
    """
    info = model_info(name)
    check_options(info, options)
    try:
        return info.builder(**{**info.defaults, **options})
    except (TypeError, ValueError) as e:  # an option of the wrong type or value
        raise ModelOptionError(f"model {name!r} with options {options}: {e}") from None


def check_options(info: ModelInfo, options: dict[str, Any]) -> None:
    """Refuse options the builder does not take, and a class count no memory could hold."""
    params = inspect.signature(info.builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            known = sorted(k for k, p in params.items() if p.kind is p.KEYWORD_ONLY or p.default
                           is not p.empty)  # fmt: skip
            raise ModelOptionError(
                f"unknown option(s) {unknown} for model {info.name!r}; it takes {known}"
            )
    if "shortcut" in options and {**info.defaults, **options}.get("residual") is False:
        # Section 4.1's plain baselines have no shortcut connections at all: option A/B/C
        # changes nothing in them. Said once, not refused: create_model("resnet34",
        # shortcut="A", residual=False) names a variant the way the paper's text does.
        import logging

        logging.getLogger("reslab.models").warning(
            "%s with residual=False is a plain net without shortcuts: shortcut=%r changes "
            "nothing (a resnet compares options A/B/C)",
            info.name,
            options["shortcut"],
        )
    problem = _num_classes_problem(options.get("num_classes"))
    if problem:
        raise ModelOptionError(f"{problem} (model {info.name})")
    for key, value in options.items():
        p = params.get(key)
        problem = None if p is None else _type_problem(key, value, p.default)
        if problem:
            raise ModelOptionError(f"{problem} (model {info.name})")


def _type_problem(key: str, value: Any, default: Any) -> str | None:
    """What is wrong with `value` for an option whose builder default is `default` (its type
    is the option's type), or None. A builder would take "no" as a true `residual`."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            return f"{key} must be true or false, got {value!r}"
    elif isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{key} must be a whole number, got {value!r}"
    elif isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{key} must be a number, got {value!r}"
    elif isinstance(default, str) and not isinstance(value, str):
        return f"{key} must be a string, got {value!r}"
    return None


def _option_defaults(key: str) -> list[Any]:
    """The defaults that every registered builder taking `key` gives it (their types)."""
    return [
        p.default
        for info in _REGISTRY.values()
        for k, p in inspect.signature(info.builder).parameters.items()
        if k == key and p.default is not p.empty
    ]


def normalize_options(options: dict[str, Any]) -> dict[str, Any]:
    """`options` with numbers written as strings read as numbers where every builder taking the
    option takes a float: YAML 1.1 reads `dropout: 5e-1` (no dot) as the string "5e-1", which
    the float fields of a config already take as 0.5."""
    _ensure_loaded()
    out = dict(options)
    for key, value in options.items():
        defaults = _option_defaults(key) if isinstance(value, str) else []
        if defaults and all(isinstance(d, float) for d in defaults):
            try:
                number = float(value)
            except ValueError:
                continue  # left for option_type_problem to name
            if math.isfinite(number):
                out[key] = number
    return out


def _num_classes_problem(n: Any) -> str | None:
    if n is not None and (
        not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CLASSES
    ):
        return f"num_classes must be a whole number in 1..{MAX_CLASSES}, got {n!r}"
    return None


def option_type_problem(options: dict[str, Any]) -> str | None:
    """The first option that no model takes, or whose value is wrong for every model taking
    it (a recipe's or a weights file's options, judged before the model they go to is known).
    """
    _ensure_loaded()
    takers = [inspect.signature(i.builder).parameters for i in _REGISTRY.values()]
    for key, value in options.items():
        if not any(key in ps or any(p.kind is p.VAR_KEYWORD for p in ps.values())
                   for ps in takers):  # fmt: skip
            # Caught here, the line names the recipe or file; at build time it could not.
            known = sorted({k for ps in takers for k, p in ps.items()
                            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)})  # fmt: skip
            return f"{key}: no model takes this option; the models' options are {known}"
        if key == "num_classes" and (problem := _num_classes_problem(value)):
            return problem
        problems = [_type_problem(key, value, d) for d in _option_defaults(key)]
        if problems and all(problems):
            return problems[0]
    return None


def _ensure_loaded() -> None:
    # The model modules register themselves on import; importing here keeps `import reslab`
    # free of side effects until a model is asked for.
    from reslab.models import alexnet, cifar, resnet  # noqa: F401
