"""Typed dataclass fields as the single source of truth for values, choices, flags and help.

Every config in ``seg.config`` is a dataclass whose fields carry their type, default and an
attribute docstring (the string literal under the field). From these alone this module
derives what used to be written by hand in several places:

- allowed values: a field typed ``Literal[...]`` accepts exactly those values; argparse
  ``choices``, the validation message (``check_literals``) and the docs come from the type;
- command-line flags: ``add_flags`` builds argparse options from the fields (name, type,
  default, choices, help text from the docstring); a field's ``metadata`` may rename its
  flag (``{"flag": "--list"}``), add option aliases (``aliases_flags``) or value aliases
  (``aliases``), give the bare flag a value (``const``) or, in a
  config where only some fields are flags (training), mark the ones that are;
- parsing: YAML files, dotted overrides (``train.lr=3e-4``) and flag strings go through one
  coercion (``coerce``) that follows the field's type. YAML is read with YAML 1.2 booleans
  (only ``true``/``false``): under YAML 1.1, ``no``/``yes``/``on``/``off`` became booleans,
  so ``train.mixed_precision=no`` arrived as ``False`` and was refused.

Attribute docstrings are read from the class source with ``ast`` (once per class, cached):
Python keeps no runtime record of them, and a ``help=`` string per field would write each
description twice.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

ALIASES = "aliases"  # metadata key: {"old value": "value"} accepted on input


# ---- YAML with YAML 1.2 booleans -------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose booleans are only true/false (YAML 1.2 core schema)."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def load_yaml(text) -> Any:
    """Parse YAML text or a stream safely (no Python objects), with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


# ---- types ----------------------------------------------------------------------------------

def _is_optional(tp) -> tuple[bool, Any]:
    """(True, X) for ``X | None`` / ``Optional[X]``, else (False, tp)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def choices(tp) -> tuple | None:
    """The allowed values of a ``Literal[...]`` (or optional Literal) type, else None."""
    _, inner = _is_optional(tp)
    return get_args(inner) if get_origin(inner) is Literal else None


def type_name(tp) -> str:
    optional, inner = _is_optional(tp)
    allowed = choices(inner)
    name = " | ".join(map(str, allowed)) if allowed else getattr(inner, "__name__", str(inner))
    return f"{name} | null" if optional else name


def coerce(value: Any, tp, where: str, aliases: dict | None = None) -> Any:
    """``value`` (from YAML, an override or a flag string) converted to type ``tp``.

    Raises:
        ValueError: naming ``where`` (e.g. ``train.lr``), the value and the expected type.
    """
    optional, inner = _is_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))):
        return None
    if isinstance(value, str) and aliases and value in aliases:
        value = aliases[value]
    allowed = choices(inner)
    if allowed is not None:
        candidates = [value, str(value)] if not isinstance(value, bool) else [value]
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            candidates.append(int(value))  # Literal[1, 3] from a flag or an override string
        for candidate in candidates:
            if candidate in allowed:
                return candidate
        shown = ", ".join(map(repr, allowed))
        extra = f" (also accepted: {', '.join(f'{k!r} for {v!r}' for k, v in aliases.items())})" if aliases else ""
        raise ValueError(f"{where}={value!r} is not valid; allowed values are {shown}{extra}")
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
    elif inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    number = float(value)
                    if number.is_integer():
                        return int(number)
                except ValueError:
                    pass
    elif inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError(f"{where}={value!r} is not valid; expected a value of type {type_name(tp)}")


def check_literals(obj, section: str) -> None:
    """Validate every ``Literal``-typed field of dataclass instance ``obj`` (in ``__post_init__``)."""
    for f in dataclasses.fields(obj):
        tp = field_types(type(obj))[f.name]
        allowed = choices(tp)
        value = getattr(obj, f.name)
        if allowed is not None and value not in allowed and not (value is None and _is_optional(tp)[0]):
            raise ValueError(f"{section}.{f.name}={value!r} is not valid; allowed values are "
                             f"{', '.join(map(repr, allowed))}")


def check_range(section: str, name: str, value, low=None, high=None, low_open=False, high_open=False) -> None:
    """``low <= value <= high`` (``<`` where open), else a ValueError naming the field and the bound."""
    bad = (low is not None and (value < low or (low_open and value == low))) or \
          (high is not None and (value > high or (high_open and value == high)))
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"{section}.{name}={value!r} is not valid; it must be {' and '.join(p for p in (lo, hi) if p)}")


# ---- fields and their docs ------------------------------------------------------------------

@functools.cache
def field_types(cls) -> dict[str, Any]:
    hints = get_type_hints(cls, include_extras=False)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass and its bases: ``{field: text}``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                    isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant) and \
                    isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


# ---- argparse -------------------------------------------------------------------------------

class _OptionalValue(argparse.Action):
    """A flag whose value is optional (``--scheduler [NAME]``): the bare flag means ``const``.

    argparse hands the optional value a following dotted override (``--scheduler train.lr=1e-3``);
    that one is kept as an override (``namespace.overrides_before``) and the flag gets ``const``.
    """

    def __call__(self, parser, namespace, value, option_string=None):
        if isinstance(value, str) and "=" in value:
            namespace.overrides_before = [*getattr(namespace, "overrides_before", []), value]
            value = self.const
        try:
            value = coerce(value, self.field_type, option_string)
        except ValueError as exc:
            parser.error(f"argument {option_string}: {exc}")
        setattr(namespace, self.dest, value)


def add_flags(parser, cls, *, only_marked: bool = False, names: list[str] | None = None,
              dest_prefix: str = "") -> list[str]:
    """Add one argparse option per field of dataclass ``cls``; returns the dests added.

    Absent options are left out of the namespace (``argparse.SUPPRESS``), so callers build the
    dataclass from what was given and its defaults fill the rest.

    Args:
        only_marked: only fields whose metadata has ``flag`` (training: the flags of the
            original U-Net scripts and a few more; everything else is a dotted override).
        names: only these fields, in this order.
        dest_prefix: prefix of each namespace attribute (two configs in one parser).
    """
    types_ = field_types(cls)
    docs = field_docs(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    selected = [by_name[n] for n in names] if names is not None else list(by_name.values())
    added = []
    for f in selected:
        if only_marked and "flag" not in f.metadata:
            continue
        tp = types_[f.name]
        optional, inner = _is_optional(tp)
        default = default_of(f)
        option = f.metadata["flag"] if isinstance(f.metadata.get("flag"), str) else (
            f"--no_{f.name}" if inner is bool and default is True else f"--{f.name}")
        help_text = docs.get(f.name, "")
        if default not in (None, "", False) and not (inner is bool):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = dict(dest=dest_prefix + f.name, default=argparse.SUPPRESS, help=help_text)
        aliases = f.metadata.get(ALIASES)
        if inner is bool:
            negated = option.startswith("--no_") and default is True
            kwargs["action"] = "store_false" if negated else "store_true"
            if negated:
                kwargs["help"] = f"turn off {f.name}: {help_text}"
        else:
            allowed = choices(tp)
            kwargs["metavar"] = ("{" + ",".join(map(str, allowed)) + "}" if allowed
                                 else f.metadata.get("metavar", f.name.upper()))
            if "const" in f.metadata:  # value converted by the action (it may be an override)
                kwargs.update(nargs="?", const=f.metadata["const"], action=_OptionalValue)
            else:
                kwargs["type"] = functools.partial(_parse_flag, tp=tp, where=option, aliases=aliases)
        options = [option, *f.metadata.get("aliases_flags", ())]
        action = parser.add_argument(*options, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})
        if isinstance(action, _OptionalValue):
            action.field_type = tp
        added.append(f.name)
    return added


def _parse_flag(text: str, tp, where: str, aliases: dict | None):
    try:
        return coerce(text, tp, where, aliases)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def given(namespace: argparse.Namespace, cls, dest_prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` that were given on the command line: ``{field: value}``."""
    out = {}
    for f in dataclasses.fields(cls):
        dest = dest_prefix + f.name
        if hasattr(namespace, dest):
            out[f.name] = getattr(namespace, dest)
    return out


def from_flags(cls, namespace: argparse.Namespace, **fixed):
    """An instance of ``cls`` from the given flags (defaults for the rest) and ``fixed`` values."""
    return cls(**{**given(namespace, cls), **fixed})


__all__ = ["ALIASES", "add_flags", "check_literals", "check_range", "choices", "coerce", "field_docs",
           "field_types", "from_flags", "given", "load_yaml", "type_name"]
