"""The user's own model (``model.arch: custom``): ``model.factory: "package.module:function"`` and ``model.kwargs``.

THIS RUNS THE USER'S CODE: the module is imported and the function called. It is safe only because the
factory comes from the user's own validated ``params.yaml``: kdprune.models builds a custom model only when
the spec's factory equals that one (``allowed_factory``), so a checkpoint or compact file that names another
factory (``os:system``, say) never causes an import by itself.

The function is called with ``num_classes=<classes of the data>`` and the kwargs, plus ``in_channels=`` when
its signature takes that argument (or ``**kwargs``); a factory without ``in_channels`` is assumed to take
3-channel images, and single-channel data is repeated to 3 channels (as for torchvision models). Spec:
``{"arch": "custom", "factory": "pkg.mod:fn", "kwargs": {...}, "num_classes": 10, "in_channels": 1}``.
"""
from __future__ import annotations

import importlib
import inspect
import json
from typing import Any

import torch.nn as nn

from kdprune.io import CheckpointError
from kdprune.params import FACTORY_RE, MAX_FACTORY_CHARS, MAX_KWARGS_CHARS, MAX_KWARGS_ITEMS
from kdprune.schema import json_like


def check(factory: Any, kwargs: Any) -> None:
    if not (isinstance(factory, str) and len(factory) <= MAX_FACTORY_CHARS and FACTORY_RE.fullmatch(factory)):
        raise ValueError(f"custom model factory {str(factory)[:80]!r} is not \"package.module:function\"")
    if not (isinstance(kwargs, dict) and len(kwargs) <= MAX_KWARGS_ITEMS
            and all(isinstance(k, str) and k.isidentifier() for k in kwargs)
            and all(json_like(v) for v in kwargs.values()) and len(json.dumps(kwargs)) <= MAX_KWARGS_CHARS):
        raise ValueError(f"custom model kwargs must be a small mapping of scalars and lists, got {str(kwargs)[:80]}")


class FactoryError(CheckpointError):
    """``model.factory`` cannot be imported or called, or did not build a model; the message names it."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def signature_of(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some built-ins have none
        return None


def takes_in_channels(fn) -> bool:
    sig = signature_of(fn)
    if sig is None:
        return False
    return "in_channels" in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def factory_function(factory: str, allowed_factory: str | None):
    """Import ``factory``, only when it is ``allowed_factory`` (the validated ``model.factory`` of params.yaml)."""
    if factory != allowed_factory:
        raise CheckpointError(
            f"the model names the custom factory {factory!r}, which is not this project's model.factory "
            f"({allowed_factory!r}); kdprune imports a factory only when params.yaml names it, so a model file "
            "cannot run code by itself")
    module_name, fn_name = factory.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise FactoryError(f"model.factory {factory!r}: cannot import {module_name}: {e} (run from the repository "
                           "root; the module must be importable from there)") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing: say where, in one line
        raise FactoryError(f"model.factory {factory!r}: importing {module_name} raised {_first_line(e)}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise FactoryError(f"model.factory {factory!r}: {module_name} has no function {fn_name}")
    return fn


def _call(factory: str, fn, call: dict[str, Any]) -> Any:
    """``fn(**call)``; a function that is no model builder, rejected kwargs or an exception are one FactoryError."""
    shown = f"{factory.split(':')[1]}({', '.join(f'{k}={v!r}' for k, v in call.items())})"[:300]
    sig = signature_of(fn)
    if sig is not None:
        params = sig.parameters.values()
        if "num_classes" not in sig.parameters and not any(p.kind is p.VAR_KEYWORD for p in params):
            raise FactoryError(f"model.factory {factory!r} is not a model builder: it takes {str(sig)[:200]}, and "
                               f"kdprune calls it as {shown} (num_classes from the data, model.kwargs as keywords)")
        try:
            sig.bind(**call)
        except TypeError as e:
            raise FactoryError(f"model.factory {factory!r} cannot be called as {shown}: {e} (its signature is "
                               f"{str(sig)[:200]}; model.kwargs gives every argument but num_classes and "
                               "in_channels)") from None
    try:
        return fn(**call)
    except Exception as e:  # noqa: BLE001 - the user's code failed: one line naming the factory and the call
        raise FactoryError(f"model.factory {factory!r} raised {_first_line(e)} when called as {shown}") from None


def build(factory: str, kwargs: dict, num_classes: int, in_channels: int,
          allowed_factory: str | None) -> tuple[nn.Module, bool]:
    """(the user's module, whether it took ``in_channels`` itself)."""
    fn = factory_function(factory, allowed_factory)
    takes = takes_in_channels(fn)
    extra = {"in_channels": in_channels} if takes else {}
    model = _call(factory, fn, {"num_classes": num_classes, **extra, **kwargs})
    if not isinstance(model, nn.Module):
        raise FactoryError(f"model.factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model, takes
