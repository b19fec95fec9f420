"""Parsing and checking ``--set key=value`` overrides against the typed fields they target.

Every value is converted to the type of the field's default and checked before anything is built or
written; an unknown key gets the closest known names as suggestions.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import typing
from typing import Any


class SettingError(ValueError):
    """A ``--set`` override that names no field or whose value does not fit the field's type."""


def _field_types(cls) -> dict[str, Any]:
    return {f.name: _annotation(cls, f) for f in dataclasses.fields(cls) if not f.name.startswith("_")}


def _annotation(cls, f: dataclasses.Field) -> Any:
    """The field's type, evaluated in the module of the class that declared it.

    ``typing.get_type_hints`` on the whole class fails on forward references inside transformers'
    own base config, so each annotation is resolved alone; an unresolvable one falls back to the
    type of the field's default.
    """
    if not isinstance(f.type, str):
        return f.type
    for klass in cls.__mro__:
        if f.name in getattr(klass, "__annotations__", {}):
            namespace = vars(sys.modules[klass.__module__])
            try:
                return eval(f.type, dict(namespace))  # noqa: S307 - annotations of our own classes
            except Exception:
                break
    default = f.default if f.default is not dataclasses.MISSING else None
    return type(default) if default is not None else Any


def _convert(key: str, raw: str, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    if optional and raw.lower() in ("none", "null"):
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        errors = []
        for arg in args:
            try:
                return _convert(key, raw, arg)
            except SettingError as err:
                errors.append(str(err))
        raise SettingError(errors[0])
    try:
        if annotation is bool:
            lowered = raw.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            return int(raw)
        if annotation is float:
            return float(raw)
        if annotation is str:
            return raw
        if origin in (dict, list) or annotation in (dict, list):
            value = json.loads(raw)
            if not isinstance(value, origin or annotation):
                raise ValueError
            return value
    except (ValueError, json.JSONDecodeError):
        name = getattr(annotation, "__name__", str(annotation))
        raise SettingError(f"--set {key}={raw!r}: expected a value of type {name}") from None
    return raw


def parse_assignments(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item or item.startswith("="):
            raise SettingError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def apply_settings(raw: dict[str, str], targets: dict[str, type]) -> dict[str, dict[str, Any]]:
    """Routes each ``key=value`` to the dataclass that owns the key.

    ``targets`` maps a namespace to a dataclass; a key ``ns.field`` targets that namespace
    explicitly, a bare ``field`` the unique namespace that has it. Returns converted values by
    namespace. Raises ``SettingError`` naming the key (and close matches) on any problem.
    """
    fields = {ns: _field_types(cls) for ns, cls in targets.items()}
    out: dict[str, dict[str, Any]] = {ns: {} for ns in targets}
    for key, value in raw.items():
        if "." in key and key.split(".", 1)[0] in fields:
            ns, name = key.split(".", 1)
            owners = [ns] if name in fields[ns] else []
        else:
            name = key
            owners = [ns for ns, names in fields.items() if name in names]
        if not owners:
            known = [n for names in fields.values() for n in names] + [
                f"{ns}.{n}" for ns, names in fields.items() for n in names
            ]
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `decollapse list` shows the knobs"
            raise SettingError(f"--set {key}: unknown key{hint}")
        if len(owners) > 1:
            raise SettingError(f"--set {key}: ambiguous, prefix it with one of {', '.join(owners)}")
        ns = owners[0]
        out[ns][name] = _convert(key, value, fields[ns][name])
    return out
