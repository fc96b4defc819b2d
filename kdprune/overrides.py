"""Params overrides for ``dvc exp run -S``, written so that DVC reads back exactly the value kdprune validated.

DVC (3.67, dvc/utils/hydra.py ``apply_overrides``) reads every ``-S key=value`` with Hydra's override grammar,
applies it to params.yaml with OmegaConf and writes the *resolved* result back. Both interpret text:

- ``a,b``, ``range(0,1000)``, ``choice(x,y)``, ``shuffle(...)`` are sweeps: with ``--queue`` DVC queues one
  experiment per value (``range(0,1000)`` queues a thousand), so a string param from someone's preset would
  silently multiply the experiments and split the value;
- ``${oc.env:NAME}`` reads an environment variable and ``${other.key}`` copies another param; OmegaConf
  resolves these in the override *and in every value already in params.yaml*, so a params.yaml holding
  ``data.root: ${oc.env:AWS_SECRET_ACCESS_KEY}`` puts the secret into params.yaml, the experiment's git
  commit and MLflow on the first ``dvc exp run -S``.

So kdprune never hands DVC a raw string: :func:`override` writes each value as a Hydra literal (strings
single-quoted, quotes and backslashes escaped, ``${`` escaped for OmegaConf), :func:`interpolations` finds
``${`` in a params file (refused by every kdprune command that calls DVC, and by the pipeline's validate
stage), and :func:`dvc_args` checks, by running DVC's own parse-and-apply steps in memory, that the
overrides are no sweep and that DVC would write exactly the intended values, before anything is queued.
"""
from __future__ import annotations

import math
import re
from typing import Any

from kdprune.schema import safe_load_yaml

MAX_STRING = 4096  # characters of one string value (params' longest legitimate strings are paths)


class OverrideError(ValueError):
    """An override that DVC would not read back as given; the message names the key."""


def _escape_interpolation(text: str) -> str:
    """OmegaConf: ``\\${`` is a literal ``${``; backslashes right before it are doubled to stay literal."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)


def _quote(text: str) -> str:
    """Hydra single-quoted string: backslashes right before a quote (or the closing quote) are doubled and the
    quote itself escaped (hydra/core/override_parser/overrides_visitor.py ``_unescape_quoted_string``)."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return f"'{text}'"


def literal(value: Any, key: str = "value") -> str:
    """``value`` (a YAML scalar or list) in Hydra's override grammar, read back as exactly ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise OverrideError(f"{key} = {value}: not a finite number")
        return repr(value)
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise OverrideError(f"{key}: a string of {len(value):,} characters; at most {MAX_STRING:,}")
        return _quote(_escape_interpolation(value))
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(literal(v, key) for v in value) + "]"
    raise OverrideError(f"{key} = {str(value)[:80]!r}: a {type(value).__name__}; an override is a number, a "
                        "string, true/false, null or a list of those (set a mapping's keys one by one)")


# Mappings whose keys params.yaml need not hold: DVC applies overrides in OmegaConf's struct mode, where
# `model.kwargs.width=16` (and `model.kwargs={width: 16}`) fail with "Could not override" when params.yaml's
# kwargs lacks the key; Hydra's `++key=value` adds the key or replaces it.
FREE_FORM = ("model.kwargs.",)


def override(key: str, value: Any) -> str:
    """``key=<literal>`` for ``dvc exp run -S`` (``++key=<literal>`` below a FREE_FORM mapping)."""
    return f"{'++' if key.startswith(FREE_FORM) else ''}{key}={literal(value, key)}"


def interpolations(data: Any, prefix: str = "") -> list[str]:
    """Dotted keys of the string values in ``data`` that contain ``${`` (OmegaConf would resolve them)."""
    found: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            found += interpolations(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += interpolations(v, f"{prefix}[{i}]")
    elif isinstance(data, str) and "${" in data:
        found.append(prefix or "value")
    return found


def check_no_interpolation(data: Any, where: str) -> None:
    """Refuse a params file with ``${`` in a value, naming the keys."""
    keys = interpolations(data)
    if keys:
        raise OverrideError(
            f"{where}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} contain(s) '${{': DVC's "
            "`dvc exp run -S` resolves such values with OmegaConf (${oc.env:NAME} reads an environment variable "
            "into params.yaml, git and MLflow), so kdprune refuses them; write the value itself")


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'prune.ratio': 0.9} -> {'prune': {'ratio': 0.9}}; a key below a non-section is an error."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise OverrideError(f"{key}: {p} is not a section")
        node[leaf] = value
    return out


def _get(tree: Any, key: str) -> Any:
    for p in key.split("."):
        tree = tree[p]
    return tree


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def dvc_args(base: dict, values: dict[str, Any]) -> list[str]:
    """``-S key=value`` arguments that make DVC write exactly ``values`` over ``base`` (params.yaml's content).

    Raises :class:`OverrideError` naming the key when ``base`` holds an interpolation, when a value cannot be
    written, or when DVC's own steps (Hydra's parser, OmegaConf apply + resolve, run in memory) would read a
    sweep or a different value."""
    check_no_interpolation(base, "params.yaml")
    check_no_interpolation(values, "override")  # escaped below, but a ${ in a param is never intended
    sets = [override(k, v) for k, v in values.items()]
    if not sets:
        return []
    # heavy optional dependencies (DVC and its Hydra/OmegaConf), imported only when overrides are checked
    from dvc.utils.hydra import get_hydra_sweeps, to_hydra_overrides
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        combos = get_hydra_sweeps({"params.yaml": sets})
    except Exception as e:  # a parse error: name the override
        raise OverrideError(f"DVC cannot read the overrides {sets!r}: {' '.join(str(e).split())[:200]}") from None
    if len(combos) != 1:
        raise OverrideError(f"the overrides {sets!r} would make DVC queue {len(combos)} experiments (a sweep)")
    tree = nest(dict.fromkeys(values))
    try:
        cfg = OmegaConf.create(tree, flags={"allow_objects": True})
        OmegaConf.set_struct(cfg, True)
        ConfigLoaderImpl._apply_overrides_to_config(to_hydra_overrides(sets), cfg)
        written = OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise OverrideError(f"DVC cannot apply the overrides {sets!r}: {' '.join(str(e).split())[:200]}") from None
    for k, v in values.items():
        got = _get(written, k)
        if _plain(got) != _plain(v) or type(got) is not type(v) and not isinstance(v, (list, tuple)):
            raise OverrideError(f"{k} = {str(v)[:80]!r}: DVC would read it back as {str(got)[:80]!r}")
    return [a for s in sets for a in ("-S", s)]


def parse(text: str) -> tuple[str, Any]:
    """A user's ``key=value`` (the value read as YAML, as params.yaml would hold it)."""
    key, eq, value = text.partition("=")
    key = key.strip()
    if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key) or len(text) > MAX_STRING:
        raise OverrideError(f"{text[:80]!r}: use key=value with a dotted params key (e.g. distill.epochs=5)")
    try:
        parsed = safe_load_yaml(value)
    except Exception as e:  # a YAML error, an alias, an oversized value
        raise OverrideError(f"{key}: cannot read the value {value[:80]!r} ({' '.join(str(e).split())[:160]})") from None
    check_no_interpolation({key: parsed}, "override")
    return key, parsed
