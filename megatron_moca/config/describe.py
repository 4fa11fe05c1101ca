"""Every key of a config dataclass, with its default and its docstring: what `moca pretrain --help` and
`moca finetune --help` list. Docstrings are the string literals right after each field (torchtitan's
attribute-docstring convention, config/configs.py), read from the class's source with `ast`."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Dict, List, Tuple


def field_docs(klass) -> Dict[str, str]:
    """name -> the docstring under that field in `klass`'s body or a dataclass base's (empty where there is
    none)."""
    docs: Dict[str, str] = {}
    for base in reversed(klass.__mro__):
        if dataclasses.is_dataclass(base):
            docs.update(_own_field_docs(base))
    return docs


def _own_field_docs(klass) -> Dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str):
                doc = " ".join(after.value.value.split())
            docs[node.target.id] = doc
    return docs


def config_keys(klass, prefix: str = "") -> List[Tuple[str, object, str]]:
    """(dotted key, default, docstring) of every leaf field, nested sections expanded, in source order."""
    hints = typing.get_type_hints(klass)
    docs = field_docs(klass)
    instance = klass()
    rows = []
    for f in dataclasses.fields(klass):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        value = getattr(instance, f.name)
        inner = hints[f.name]
        if dataclasses.is_dataclass(value) or (dataclasses.is_dataclass(inner) and isinstance(inner, type)):
            rows += config_keys(type(value) if value is not None else inner, key + ".")
        else:
            rows.append((key, value, docs.get(f.name, "")))
    return rows


def describe(klass, width: int = 100) -> str:
    """The help text listing every key: `key = default` and its docstring, indented."""
    lines = []
    for key, default, doc in config_keys(klass):
        lines.append(f"  {key} = {default!r}")
        if doc:
            lines += textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
