"""The one way reslab reads a YAML file from disk (recipes, a run's config.yaml): plain data only.

`yaml.safe_load` already refuses tags that would build Python objects. Two more things are
refused here, each as one `UserError` line naming the file: bytes that are not UTF-8 text,
aliases (`*name`), and a key given twice in one mapping. Recipes and run configs never need
aliases, and nested ones are the "billion laughs": a file of a few hundred bytes that expands to
gigabytes once a value is walked. A repeated key (`lr: 0.1` ... `lr: 0.2`) would silently train
with the last one, which is rarely what the person who wrote the first meant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from reslab.errors import UserError


class YamlFileError(UserError):
    """A YAML file that cannot be read as plain data; the message names it and the fix."""


class YamlAliasError(YamlFileError):
    """YAML holding an alias (`*name`): refused wherever it comes from."""


class YamlDuplicateKeyError(YamlFileError):
    """A mapping naming one key twice: refused wherever it comes from."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load's loader, refusing a mapping that names a key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges, its keys may repeat
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key] + 1, key_node.start_mark.line + 1)
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: construct_mapping's own error follows
                continue
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, again: int) -> None:
        self.key, self.first, self.again = key, first, again


def read_yaml(path: str | Path, *, what: str = "") -> Any:
    """Parsed content of `path` (None for an empty file). `what` names the file's role in the
    message, e.g. "recipe"."""
    label = f"{what} {path}" if what else str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise YamlFileError(
            f"{label} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None
    return loads_yaml(text, label=label)


def loads_yaml(text: str, *, label: str) -> Any:
    """`text` parsed as plain data, aliases refused; `label` names where it came from."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                mark = event.start_mark
                raise YamlAliasError(
                    f"{label}:{mark.line + 1}: YAML aliases (*{event.anchor}) are not accepted; "
                    "write the value out in full"
                )
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise YamlDuplicateKeyError(
            f"{label}:{e.again}: {e.key!r} is given twice (first on line {e.first}); keep one"
        ) from None
    except yaml.YAMLError as e:
        raise YamlFileError(f"{label} is not valid YAML: {str(e).splitlines()[0]}") from None
