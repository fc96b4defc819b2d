"""Presets: named bundles of params overrides for the paper's settings, one command each.

A preset is ``presets/<name>.yaml`` with a ``description`` and a nested ``params`` mapping that
overrides ``params.yaml``. ``run`` validates the merged params (the same checks as every stage) and
then starts a DVC experiment named after the preset with one ``-S key=value`` per override, so the
preset lands in ``dvc exp show`` and MLflow like any other experiment and the committed
``params.yaml`` (the offline Fashion-MNIST run) is never edited.

  python -m kdprune.presets list
  python -m kdprune.presets show cifar100-resnet152          # the merged params and the dvc command
  python -m kdprune.presets run cifar100-resnet152 [--queue] [--dry-run] [-- extra dvc exp run args]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from kdprune import overrides as ovr
from kdprune.data import REGISTRY
from kdprune.dvctool import dvc_env, find_dvc
from kdprune.models import build_model, spec_from_params
from kdprune.prune.counts import dense_macs
from kdprune.params import Params, ParamsError, flatten, params_from_dict, safe_load_yaml

PRESETS = Path(__file__).resolve().parents[1] / "presets"


class PresetError(ValueError):
    """An unknown or invalid preset; the message names the file and the key."""


def available() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    path = PRESETS / f"{name}.yaml"
    if name not in available() or not path.is_file():  # a name, never a path (no '../', no '/')
        raise PresetError(f"unknown preset {name[:80]!r}; available: {available()}")
    try:
        raw = safe_load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise PresetError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict):
        raise PresetError(f"{path}: needs a 'params' mapping of overrides (and a 'description')")
    extra = set(raw) - {"description", "params", "study"}
    if extra:
        raise PresetError(f"{path}: unknown top-level keys {sorted(extra)}; allowed: description, params, study "
                          "(a study's plan, read by python -m kdprune study)")
    return raw


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def resolve(name: str, params_path: Path = PRESETS.parent / "params.yaml") -> tuple[Params, dict[str, Any]]:
    """The validated params of ``params.yaml`` + the preset, and the flat overrides."""
    preset = load_preset(name)
    base = safe_load_yaml(params_path.read_text())
    try:
        ovr.check_no_interpolation(base, str(params_path))
        ovr.check_no_interpolation(preset["params"], str(PRESETS / f"{name}.yaml"))
    except ovr.OverrideError as e:
        raise PresetError(str(e)) from None
    try:
        params = params_from_dict(merge(base, preset["params"]))
    except ParamsError as e:
        raise PresetError(f"{PRESETS / (name + '.yaml')}: {e}") from None
    return params, flatten(preset["params"])


# For the CPU-time warning (``cpu_warning``): train-split sizes, and the training speed measured on
# this project's 2-core CPU (benchmarks/README.md: ResNet-8, bf16 autocast, 173 GFLOP/s achieved).
TRAIN_IMAGES = {"fashion_mnist": 60_000, "mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000, "svhn": 73_257}
SVHN_EXTRA_IMAGES = 531_131
CPU_GFLOPS_PER_CORE = 173.2 / 2


IMAGENET_TRAIN_IMAGES, IMAGENET_CLASSES = 1_281_167, 1000  # the projection for an image folder of unknown size


def cpu_seconds(params: Params, cores: int) -> float:
    """A rough projection of the whole pipeline's training time on ``cores`` CPU cores.

    Training FLOPs per image = 3 x the forward (forward + backward), the forward counted on the
    preset's model; the KD variants add a teacher forward; evaluation and export are left out.
    """
    d = params.data
    if d.name in REGISTRY:
        info = REGISTRY[d.name]
        images = d.train_subset or TRAIN_IMAGES[d.name] + (SVHN_EXTRA_IMAGES if d.svhn_extra else 0)
        channels, classes, size = info.channels, len(info.classes), tuple(info.image_size)
    else:  # an image folder: its size is unknown until prepare reads it; project an ImageNet-sized one
        images = d.train_subset or IMAGENET_TRAIN_IMAGES
        channels, classes, size = 3, IMAGENET_CLASSES, (d.image_size or 224,) * 2
    with torch.device("meta"):  # shapes only: no memory for the weights
        model = build_model(spec_from_params(params.model, channels, classes))
    forward = 2 * dense_macs(model, (channels, *size))
    passes = 3 * params.teacher.epochs  # forward + backward = 3 forwards
    passes += sum((3 + (1 if v.endswith("kd") else 0)) * params.distill.epochs for v in params.distill.variants)
    return passes * images * forward / (CPU_GFLOPS_PER_CORE * 1e9 * max(1, cores))


def cpu_warning(name: str, params: Params, overrides: dict[str, Any] | None = None) -> str | None:
    """A warning when a preset meant for a GPU would run on the CPU here.

    A preset is meant for a GPU when its own params set ``runtime.device`` to something other than 'cpu' (the
    paper presets say ``auto``); one that leaves the device alone, like ``study-fashion``, was sized for this CPU.
    ``overrides``: the preset's own params, flattened; None judges by the merged ``params`` alone."""
    device = params.runtime.device if overrides is None else overrides.get("runtime.device", "cpu")
    if device == "cpu" or torch.cuda.is_available():
        return None
    cores = params.runtime.threads or os.cpu_count() or 1
    hours = cpu_seconds(params, cores) / 3600
    return (f"warning: preset {name} is meant for a GPU, but torch sees none here, so it would train on the CPU: "
            f"about {hours:,.1f} hours on {cores} cores (a rough estimate from its epochs x images x model FLOPs at "
            f"the {CPU_GFLOPS_PER_CORE:.0f} GFLOP/s per core measured in benchmarks/README.md)")


def command(name: str, overrides: dict[str, Any], queue: bool = False, extra: list[str] | None = None) -> list[str]:
    """``dvc exp run -n NAME [--queue] -S ...``: every value written so that DVC reads back exactly it (never a
    sweep, never an interpolation: kdprune/overrides.py)."""
    cmd = ["dvc", "exp", "run", "-n", name]
    if queue:
        cmd.append("--queue")
    try:
        cmd += ovr.dvc_args({}, overrides)
    except ovr.OverrideError as e:
        raise PresetError(f"{PRESETS / (name + '.yaml')}: {e}") from None
    return cmd + list(extra or [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdprune.presets", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    for c in ("show", "run"):
        sp = sub.add_parser(c)
        sp.add_argument("name")
        if c == "run":
            sp.add_argument("--queue", action="store_true", help="queue it (dvc queue start runs it)")
            sp.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
            sp.add_argument("extra", nargs="*", help="more dvc exp run arguments, after -- (optional)")
    argv = list(sys.argv[1:] if argv is None else argv)
    # everything after the first "--" goes to dvc exp run as it is, wherever the options stood before it
    # (argparse alone rejects `run NAME --dry-run -- ARGS`: its positionals are matched before the options)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, tail = ap.parse_args(argv[:cut]), argv[cut + 1:]
    if tail and args.cmd != "run":
        ap.error(f"{args.cmd} takes no dvc exp run arguments after --")
    if args.cmd == "run":
        args.extra = list(args.extra) + tail
    try:
        if args.cmd == "list":
            for n in available():
                print(f"{n:24s} {load_preset(n).get('description', '')}")
            return 0
        params, overrides = resolve(args.name)
        cmd = command(args.name, overrides, getattr(args, "queue", False), getattr(args, "extra", None))
    except PresetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "show":
        print(json.dumps(params.to_dict(), indent=2))
        print(shlex.join(cmd))
        return 0
    warning = cpu_warning(args.name, params, overrides)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    exe = find_dvc()  # the printed command says plain dvc; run the one found (a venv not activated has one)
    try:
        return subprocess.call([exe or cmd[0], *cmd[1:]], env=dvc_env())  # stages run plain `python`
    except FileNotFoundError:
        print("error: dvc is not on PATH: run it as ./run.sh preset NAME (which uses the project's .venv), or "
              "activate the environment that has dvc (. .venv/bin/activate)", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
