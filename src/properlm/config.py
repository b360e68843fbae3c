"""Config dataclasses from YAML plus ``key=value`` overrides, as in torchtune and litgpt.

A config is a plain (possibly nested) dataclass with a docstring on every field
and range checks in ``__post_init__``. This module knows none of the concrete
classes: it reads the field types with ``typing.get_type_hints`` and checks
values against them. Config classes must be defined at module level so their
annotations resolve.

    cfg = load_config(TrainConfig, "configs/lamp2m.yaml", ["stage2.num_experts=8", "train.lr=1e-4"])
    save_config(cfg, run_dir / "config.yaml")     # reloads to an equal object

The YAML file and the overrides are merged as plain values first; the dataclass
is built once, at the end, so a bad value in the file that an override replaces
is never seen, and ``__post_init__`` runs on the final values.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import datetime
import functools
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

from properlm.errors import ConfigError
from properlm.io import read_text, write_text

T = TypeVar("T")

_NULL_SPELLINGS = {"null", "Null", "NULL", "~"}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of the init fields of a dataclass, in field order."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError) as e:
        raise ConfigError(
            f"cannot resolve the field types of {cls.__name__} (define it at module level): {e}"
        ) from None
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _strip_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _section_class(tp: Any) -> type | None:
    """The dataclass a field holds (directly or as Optional), else None."""
    tp = _strip_optional(tp)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _valid_keys(cls: type) -> str:
    return ", ".join(_hints(cls)) or "(none)"


# --- merging raw values -----------------------------------------------------


def _merge(tree: dict, cls: type, data: dict, prefix: str, source: str, sources: dict[str, str]) -> None:
    """Merge a YAML mapping into ``tree`` (plain values keyed like ``cls``'s fields).

    Sections (fields holding a dataclass) merge key by key; any other value replaces.
    """
    hints = _hints(cls)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"{source}: unknown key '{dotted}'; valid keys here: {_valid_keys(cls)}")
        sub = _section_class(hints[key])
        if sub is not None and isinstance(value, dict):
            if not isinstance(tree.get(key), dict):
                tree[key] = {}
            _merge(tree[key], sub, value, f"{dotted}.", source, sources)
        else:
            tree[key] = value
            sources[dotted] = source


def _apply_override(tree: dict, cls: type, override: str, sources: dict[str, str]) -> None:
    """Apply one ``a.b.c=value`` override to ``tree``."""
    source = f"override '{override}'"
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{source}: expected key=value, e.g. train.lr=1e-4")
    parts = key.split(".")
    node, node_cls = tree, cls
    for depth, part in enumerate(parts):
        hints = _hints(node_cls)
        where = ".".join(parts[:depth]) or "the top level"
        if part not in hints:
            raise ConfigError(f"{source}: unknown key '{key}'; valid keys at {where}: {_valid_keys(node_cls)}")
        if depth == len(parts) - 1:
            break
        sub = _section_class(hints[part])
        if sub is None:
            prefix = ".".join(parts[: depth + 1])
            raise ConfigError(f"{source}: '{prefix}' is a setting of type {_type_name(hints[part])}, not a section")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, node_cls = node[part], sub
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: value is not valid YAML: {str(e).splitlines()[0]}") from None
    # For a text field, keep what was typed: YAML would read "007" as 7 and "" as null.
    if _strip_optional(hints[part]) is str and not isinstance(value, str):
        if not (value is None and text.strip() in _NULL_SPELLINGS):
            value = text.strip()
    sub = _section_class(hints[part])
    if sub is not None and isinstance(value, dict):
        if not isinstance(node.get(part), dict):
            node[part] = {}
        _merge(node[part], sub, value, f"{key}.", source, sources)
    else:
        node[part] = value
        sources[key] = source


# --- building and type checking ---------------------------------------------


class _Mismatch(Exception):
    """A value that does not fit a type (turned into a ConfigError with the key)."""


def _coerce(value: Any, tp: Any, key: str, sources: dict[str, str], base: Any = None) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted where safe."""
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, sources, base)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        for a in args:  # compare types too: True == 1 but is not a valid 1
            if value == a and type(value) is type(a):
                return a
        raise _Mismatch
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise _Mismatch
            items = [_check_item(v, a, f"{key}[{i}]", sources) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_check_item(v, item_tp, f"{key}[{i}]", sources) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        val_tp = args[1] if args else Any
        return {k: _check_item(v, val_tp, f"{key}.{k}", sources) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _Mismatch
        return _build(tp, value, f"{key}.", sources, base if isinstance(base, tp) else None)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float, datetime.date)) and not isinstance(value, bool):
            return str(value)  # `name: 2024` in a file means the text
        raise _Mismatch
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _Mismatch
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch


def _check_item(value: Any, tp: Any, key: str, sources: dict[str, str]) -> Any:
    try:
        return _coerce(value, tp, key, sources)
    except _Mismatch:
        raise _type_error(value, tp, key, sources) from None


def _type_error(value: Any, tp: Any, key: str, sources: dict[str, str]) -> ConfigError:
    top = key.split("[")[0]
    source = sources.get(top) or next((s for k, s in sources.items() if top.startswith(k + ".")), "default")
    return ConfigError(f"{source}: '{key}' expects {_type_name(tp)}, got {value!r}")


def _build(cls: type[T], tree: dict, prefix: str, sources: dict[str, str], base: Any = None) -> T:
    """Build ``cls`` from merged plain values, filling the rest from ``base`` or defaults."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if f.name in tree:
            # A section given partly keeps the other values of its default instance.
            if base is not None:
                default = getattr(base, f.name)
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None if f.default is dataclasses.MISSING else f.default
            try:
                kwargs[f.name] = _coerce(tree[f.name], tp, key, sources, default)
            except _Mismatch:
                raise _type_error(tree[f.name], tp, key, sources) from None
        elif base is not None:
            kwargs[f.name] = getattr(base, f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key}' ({_type_name(tp)})")
    try:
        return cls(**kwargs)
    except ValueError as e:  # range checks in __post_init__
        where = f"'{prefix[:-1]}'" if prefix else cls.__name__
        raise ConfigError(f"invalid {where}: {e}") from None


# --- public API -------------------------------------------------------------


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a config dataclass from an optional YAML file and ``key=value`` overrides.

    Args:
        cls: the config dataclass (may nest other dataclasses as fields).
        path: a YAML mapping of field names to values; sections may be partial.
        overrides: strings like ``stage2.num_experts=8``, ``train.lr=1e-4``,
            ``flag=true``, ``x=null``, ``ids=[1,2]``, ``stage2={k: 8}``;
            values are read as YAML, applied in order after the file.

    Returns:
        An instance of ``cls``; ``__post_init__`` has run on the final values.

    Raises:
        ConfigError: unreadable YAML, unknown key (naming it and the valid keys),
            a value of the wrong type (naming key, expected type and value),
            or a ``ValueError`` raised by a ``__post_init__``.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        try:
            data = yaml.safe_load(read_text(path))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: malformed YAML{line}: {getattr(e, 'problem', None) or e}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
        _merge(tree, cls, data, "", str(path), sources)
    for override in overrides:
        _apply_override(tree, cls, override, sources)
    return _build(cls, tree, "", sources)


def to_dict(cfg: Any) -> Any:
    """Plain YAML-safe values of a config: dataclasses -> dicts, tuples -> lists, paths -> str."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML (atomically); ``load_config(type(cfg), path)`` gives it back."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
    write_text(path, text)
