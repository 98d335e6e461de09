"""Typed configs that a JSON file or command-line flags can set (flags win over the file).

Each command has one dataclass; every field has a one-line comment after it (``# ...``) or, in
CleanRL's style, a docstring on the line below it, which becomes its ``--help`` text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def _field_help(cls: type) -> dict[str, str]:
    """Each field's help text, from the class source: a trailing ``# comment`` on the field's line,
    or (CleanRL's style) a string literal on the line after the field."""
    import ast
    import inspect
    import itertools
    import textwrap

    helps: dict[str, str] = {}
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return helps
    for line in source.splitlines():
        stripped = line.strip()
        if ":" in stripped and "#" in stripped and not stripped.startswith("#"):
            name = stripped.split(":", 1)[0].strip()
            helps[name] = stripped.split("#", 1)[1].strip()
    body = next((node.body for node in ast.parse(source).body if isinstance(node, ast.ClassDef)), [])
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            helps[node.target.id] = " ".join(after.value.value.split())
    return helps


def _parser_for(tp: Any) -> Callable[[str], Any]:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        inner = _parser_for(args[0])
        return lambda s: None if s.lower() in ("none", "null") else inner(s)
    if tp is bool:
        def parse_bool(s: str) -> bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")
        return parse_bool
    if tp in (int, float, str):
        return tp
    if origin in (dict, list, tuple) or tp in (dict, list):
        return json.loads
    return str


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[DataclassInstance]) -> None:
    """One ``--field`` flag per dataclass field, plus ``--config FILE.json``."""
    hints = typing.get_type_hints(cls)
    helps = _field_help(cls)
    parser.add_argument("--config", type=Path, help="JSON file of field values (flags override it)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"{cls.__name__}.{f.name} has no default; every config field needs one")
        parser.add_argument(
            flag, dest=f.name, type=_parser_for(hints[f.name]), default=argparse.SUPPRESS,
            help=f"{helps.get(f.name, '')} (default: {default!r})",
        )


def config_from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    """Build ``cls`` from ``--config`` (if any) overlaid with the flags given."""
    values: dict[str, Any] = {}
    if getattr(namespace, "config", None):
        path = Path(namespace.config)
        if not path.exists():
            raise FileNotFoundError(f"config file not found: '{path}'")
        values.update(json.loads(path.read_text()))
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)} for {cls.__name__}; expected some of {sorted(names)}")
    values.update({k: v for k, v in vars(namespace).items() if k in names})
    config = cls(**values)
    check = getattr(config, "validate", None)
    if check is not None:
        check()
    return config


def config_to_json(config: Any) -> str:
    """The one format of every command's ``config.json`` (objects passed in code appear as their repr)."""
    return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True, default=repr)
