"""The typed schema that params.yaml is read into: frozen dataclasses whose annotations say what each key may hold.

``build`` checks a raw YAML mapping against such a dataclass (unknown keys with a close-match hint, types, then the
section's own ``validate``); every message names the key, shows the value bounded (``show``) and says what is
allowed. ``safe_load_yaml`` parses hand-written YAML without aliases and with YAML 1.2 floats. No torch, no
kdprune imports: stages/validate.py runs all of this whenever any param changes."""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from typing import Any, Literal

import yaml


class ParamsError(ValueError):
    """Invalid params.yaml content. The message names the key, the value and what is allowed."""


INT_DIGITS = 4300  # Python reads and writes at most this many decimal digits (sys.get_int_max_str_digits())


class OversizedInt:
    """An integer in params YAML too long to read (over INT_DIGITS digits: ``int()`` raises ValueError there).
    The loader keeps only its length, so validation names the key instead of a traceback; it is no int, so
    nothing accepts it."""

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer {self.digits:,} digits long>"


class _Repr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:  # past INT_DIGITS digits, e.g. from 0xfff... (hex is read without that limit)
            return f"<an integer {x.bit_length():,} bits long>"


_REPR = _Repr()  # keyword arguments need Python 3.12
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel, _REPR.maxlong = 60, 60, 4, 4, 3, 40


def show(value: Any) -> str:
    """``repr`` of a param value, bounded: a huge or deeply nested value never floods (or hangs) a message."""
    return _REPR.repr(value)


def check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ParamsError(f"params.yaml: {show(key)[1:-1] if isinstance(key, str) else show(key)} = {show(value)} "
                          f"is invalid: {allowed}")


def within(lo: float, value: float, hi: float) -> bool:
    """lo <= value <= hi, False for NaN."""
    return lo <= value <= hi


def json_like(value: Any, depth: int = 0) -> bool:
    """A small JSON-like value: null, bool, int, finite float, str, or a list (nested at most 2 deep) of them."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list) and depth < 2:
        return all(json_like(v, depth + 1) for v in value)
    return False


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    if isinstance(value, OversizedInt):
        raise ParamsError(f"params.yaml: {key} = {value!r} is invalid: an integer has at most {INT_DIGITS:,} digits "
                          "here (Python's limit for reading one), and every key allows far fewer")
    origin = typing.get_origin(tp)
    if origin is Literal:
        check(value in typing.get_args(tp), key, value, f"must be {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ParamsError:
                continue
        raise ParamsError(f"params.yaml: {key} = {show(value)} is invalid: must be {_type_name(tp)}")
    if origin is list:
        check(isinstance(value, list), key, value, f"must be {_type_name(tp)}")
        (inner,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is type(None):
        check(value is None, key, value, "must be null")
        return None
    if tp is bool:
        check(isinstance(value, bool), key, value, "must be true or false")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, value, "must be an integer")
        return value
    if tp is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "must be a number")
        try:
            value = float(value)
        except OverflowError:  # an integer too large for a float
            value = math.inf
        check(math.isfinite(value), key, value, "must be a finite number (not .nan or .inf)")
        return value
    if tp is str:
        check(isinstance(value, str), key, value, "must be a string")
        return value
    if tp is dict:  # checked by the section's validate (model.kwargs)
        check(isinstance(value, dict), key, value, "must be a mapping")
        return value
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), key, value, "must be a mapping of keys (a section)")
        return build(tp, value, key)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            where = show(f"{prefix}.{k}" if prefix else str(k))[1:-1]
            close = difflib.get_close_matches(str(k)[:100], list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ParamsError(f"params.yaml: unknown key '{where}'{hint} Allowed keys here: {sorted(fields)}")
    kwargs = {}
    for name in fields:
        if name in raw:
            kwargs[name] = _coerce(f"{prefix}.{name}" if prefix else name, raw[name], hints[name])
    obj = cls(**kwargs)
    obj.validate(prefix)
    return obj


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with four changes for hand-written params files:

    - no aliases (``*name``): a few KB of nested aliases expand to gigabytes (a "billion laughs" YAML bomb),
      and params.yaml has no use for them;
    - no duplicate keys in a mapping: PyYAML keeps the last one silently, while DVC refuses the file (YAML 1.2
      requires unique keys), so kdprune would run with a value DVC never sees;
    - YAML 1.2 floats: ``1e-3`` is a float, as in YAML 1.2 and in DVC's own parser (PyYAML follows YAML 1.1,
      which needs a dot, ``1.0e-3``, and reads ``1e-3`` as a string);
    - integers longer than Python reads (``INT_DIGITS``) become ``OversizedInt``, which validation refuses in one
      line naming the key, instead of a ValueError traceback.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases (*{show(event.anchor)[1:-1]}) are not allowed in params files "
                                 f"{event.start_mark}".rstrip())
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # a complex key: PyYAML refuses it itself
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.YAMLError(f"duplicate key {show(key)} on lines {seen[key]} and {line}: a key may "
                                         f"appear once in a mapping (DVC refuses the file too); keep one")
                seen[key] = line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        digits = text.replace("_", "").lstrip("+-")
        digits = len(digits) - (2 if digits[:2] in ("0x", "0o", "0b") else 0)
        if digits > INT_DIGITS:  # int() refuses it (ValueError); a base-60 1:2:3... would take quadratic time
            return OversizedInt(digits)
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def safe_load_yaml(text: str) -> Any:
    """Parse params YAML with :class:`_Loader` (no aliases, YAML 1.2 floats)."""
    loader = _Loader(text)  # what yaml.load does, with our SafeLoader subclass
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
