"""Strict construction of nested config dataclasses from YAML and dotted command-line overrides.

    cfg = load_config(PretrainConfig, "recipe.yaml", ["optim.lr=3e-4", "data.paths=/a,/b"])

Every key must name a field (unknown keys are errors that list the valid ones); values are checked
against the field's annotation (int, float, bool, str, Optional[...], List[...], nested dataclass);
an override's text is parsed for the type of the field it sets, so `optim.lr=1e-3` is a float and
`data.paths=/a,/b` a list. Design after facebookresearch/lingua's file + dotlist merge
(apps/main/train.py) with torchtitan's attribute-docstring dataclasses (config/configs.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any, Dict, List, Optional, Sequence

from megatron_moca.errors import UserError


def _hints(klass) -> Dict[str, Any]:
    return typing.get_type_hints(klass)


def _optional_inner(tp):
    """(inner type, True) for Optional[X], else (tp, False)."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(tp, value, key: str):
    """Value checked (and lightly converted: int -> float, str -> list for List[str]) for annotation tp."""
    inner, optional = _optional_inner(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"config key {key}: must not be empty")
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, dict):
            raise UserError(f"config key {key}: expected a section (mapping), got {value!r}")
        return build(inner, value, key)
    origin = typing.get_origin(inner)
    if origin in (list, List):
        (item,) = typing.get_args(inner) or (Any,)
        if isinstance(value, str):  # a comma-separated override: each item parsed for the item type
            value = [_parse_override(v, item) for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if inner is Any:
        return value
    if inner is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key {key}: expected true or false, got {value!r}")
        return value
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner in (int, float, str) and (not isinstance(value, inner) or isinstance(value, bool)):
        raise UserError(f"config key {key}: expected {inner.__name__}, got {value!r}")
    if inner is float and not math.isfinite(value):  # YAML reads .inf / .nan; no setting means them
        raise UserError(f"config key {key}: expected a finite number, got {value!r}")
    return value


def build(klass, values: Dict[str, Any], prefix: str = ""):
    """klass(**values), recursively, refusing unknown keys and wrongly typed values."""
    if hasattr(klass, "expand_config"):  # a section with named defaults (e.g. model presets)
        values = klass.expand_config(values, prefix)
    hints = _hints(klass)
    names = [f.name for f in dataclasses.fields(klass) if f.init]
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = f"section {prefix}" if prefix else "the top level"
        raise UserError(f"unknown config key(s) {', '.join(_join(prefix, k) for k in unknown)} in {where}; "
                        f"valid keys: {', '.join(names)}")
    kwargs = {name: _coerce(hints[name], value, _join(prefix, name)) for name, value in values.items()}
    return klass(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _field_type(klass, dotted: str):
    """The annotation a dotted key sets (for parsing its override text); None where not a known field."""
    tp = klass
    for part in dotted.split("."):
        tp, _ = _optional_inner(tp)
        if not dataclasses.is_dataclass(tp):
            return None
        hints = _hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _parse_override(text: str, tp):
    import yaml

    inner, optional = _optional_inner(tp) if tp is not None else (None, False)
    if optional and text.lower() in ("null", "none", "~", ""):
        return None
    if inner is str:
        return text
    if inner is float:
        try:
            return float(text)
        except ValueError:
            return text  # reported by _coerce with the key's name
    if typing.get_origin(inner) in (list, List) and not text.startswith("["):
        return text  # comma-separated
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(klass, values: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """`values` (a nested dict) with each `a.b.c=value` override set in place of what it held."""
    values = _deep_copy(values)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value (e.g. optim.lr=3e-4)")
        key, text = item.split("=", 1)
        key = key.strip()
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {key}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_override(text, _field_type(klass, key))
    return values


def merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """base with update's keys set in it, section by section."""
    out = _deep_copy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = _deep_copy(value)
    return out


def _deep_copy(values):
    if isinstance(values, dict):
        return {k: _deep_copy(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_deep_copy(v) for v in values]
    return values


MAX_YAML_VALUES = 100_000
"""The most values a config may hold once its YAML aliases are expanded (a recipe has a few hundred): ten
lines of nested aliases (the "billion laughs") would otherwise expand to gigabytes when read."""


def _expanded_size(node, memo: Dict[int, int]) -> int:
    """Values `node` holds once every alias in it is expanded (aliases share their node: counted per use)."""
    import yaml

    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once (safe_load builds it as a self-reference)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[id(node)] = min(total, MAX_YAML_VALUES + 1)
    return memo[id(node)]


def _safe_load_bounded(f, path: str):
    """yaml.safe_load, refusing documents whose aliases expand beyond MAX_YAML_VALUES values."""
    import yaml

    loader = yaml.SafeLoader(f)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise UserError(f"config file {path}: its YAML aliases expand to more than {MAX_YAML_VALUES} values; "
                            "write the values out instead")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str) -> Dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist" if not os.path.exists(path)
                        else f"config file {path} is not a regular file")
    try:
        with open(path) as f:
            values = _safe_load_bounded(f, path)
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path}: expected a mapping of sections at the top level")
    return values


def load_config(klass, path: Optional[str], overrides: Sequence[str] = ()):
    """klass built from the YAML file at `path` (None: defaults) with dotted overrides applied."""
    values = read_yaml(path) if path else {}
    return build(klass, apply_overrides(klass, values, overrides))


def to_dict(cfg) -> Dict[str, Any]:
    """A config as plain data (what build() reads back)."""
    return dataclasses.asdict(cfg)
