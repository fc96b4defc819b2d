"""Load and validate ``params.yaml`` into typed dataclasses.

This is the one place that knows what a valid parameter is. Every error names the dotted key,
the bad value and what is allowed, and all of them are raised before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "svhn")  # = kdprune.data.REGISTRY
ARCHS = {  # the model zoo (kdprune/models.py): arch -> (what it is, its depths); see stage_blocks
    "resnet": ("CIFAR ResNet, BasicBlock, 3 stages", "6n+2: 8, 14, 20, 32, 44, 56, 110, ..."),
    "resnet_bottleneck": ("CIFAR ResNet, Bottleneck, 3 stages", "9n+2: 11, 20, 29, 47, 56, 110, 164, ..."),
    "resnet_imagenet": ("ResNet-50/101/152 layout, Bottleneck, 4 stages, CIFAR 3x3 stem without max-pool",
                        "50, 101 or 152"),
}
VARIANTS = ("kd", "finetune", "scratch", "scratch_kd")
PRUNE_METHODS = ("magnitude", "l1_filter")


class ParamsError(ValueError):
    """Invalid params.yaml content. The message names the key, the value and what is allowed."""


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ParamsError(f"params.yaml: {key} = {value!r} is invalid: {allowed}")


def resolves_inside(path: str | Path, base: str | Path | None = None) -> bool:
    """Does ``path`` (relative to ``base``, default the working directory: the repository root, where
    stages run) lead into ``base`` once symlinks are resolved? A link inside the repository to a
    directory outside it does not count as inside."""
    root = Path.cwd() if base is None else Path(base)
    try:
        root = root.resolve()
        return (root / path).resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        return False


def path_stays_inside(path: str, base: str | Path | None = None) -> bool:
    """Paths from params: absolute ones are explicit and allowed; relative ones may not climb out of the
    repository (``base``, default the working directory): neither lexically (no '..' out of it) nor
    through a symlink (``resolves_inside``)."""
    p = Path(path)
    if p.is_absolute():
        return True
    depth = 0
    for part in p.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return False
    return resolves_inside(p, base)


@dataclass(frozen=True)
class DataParams:
    name: Literal["fashion_mnist", "mnist", "cifar10", "cifar100", "svhn"] = "fashion_mnist"
    root: str | None = None  # null: search the Debian package's dir (fashion_mnist), data/raw, then download
    download: bool = True  # allow torchvision's downloader when no local copy is found
    train_subset: int = 0  # 0: the whole split; N > 0: a class-stratified subset of N images
    test_subset: int = 0
    crop_padding: int = 2  # random-crop augmentation: pad by this many pixels, crop back
    svhn_extra: bool = False  # svhn only: append extra_32x32.mat (531k images) to the train split

    def validate(self, p: str) -> None:
        if self.root is not None:
            _check(bool(self.root.strip()), f"{p}.root", self.root, "must be a directory path or null")
            _check(path_stays_inside(self.root), f"{p}.root", self.root,
                   "a relative path must stay inside the repository (no '..' out of it, no symlink "
                   "to a directory outside it); "
                   "write an absolute path to use a directory elsewhere")
        _check(self.train_subset >= 0, f"{p}.train_subset", self.train_subset, "must be >= 0 (0 = all)")
        _check(self.test_subset >= 0, f"{p}.test_subset", self.test_subset, "must be >= 0 (0 = all)")
        _check(0 <= self.crop_padding <= 8, f"{p}.crop_padding", self.crop_padding, "must be in [0, 8]")
        _check(not self.svhn_extra or self.name == "svhn", f"{p}.svhn_extra", self.svhn_extra,
               f"applies to {p}.name = svhn only (it is {self.name!r}); set it to false")


# Blocks per stage of the 4-stage ImageNet ResNets (He et al. 2016, Table 1).
IMAGENET_LAYOUTS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
MAX_CHANNELS = 2048  # widest layer allowed: that of the standard ResNet-50/101/152 (and ResNet-164 at width 128)


def stage_blocks(arch: str, depth: int) -> list[int] | None:
    """Residual blocks per stage of ``arch`` at ``depth``; None where ``arch`` has no such depth.

    Depth counts the weighted layers: stem conv + 2 (BasicBlock) or 3 (Bottleneck) per block + fc;
    projection shortcuts are not counted (He et al.)."""
    if arch == "resnet":
        return [(depth - 2) // 6] * 3 if depth >= 8 and (depth - 2) % 6 == 0 else None
    if arch == "resnet_bottleneck":
        return [(depth - 2) // 9] * 3 if depth >= 11 and (depth - 2) % 9 == 0 else None
    if arch == "resnet_imagenet":
        return list(IMAGENET_LAYOUTS[depth]) if depth in IMAGENET_LAYOUTS else None
    return None


def depth_rule(arch: str) -> str:
    what, depths = ARCHS[arch]
    return f"depth {depths} ({what})"


def widest_factor(arch: str) -> int:
    """Channels of the widest layer of ``arch`` divided by its ``width`` (the stage-1 width)."""
    return {"resnet": 4, "resnet_bottleneck": 16, "resnet_imagenet": 32}[arch]


@dataclass(frozen=True)
class ModelParams:
    arch: Literal["resnet", "resnet_bottleneck", "resnet_imagenet"] = "resnet"
    depth: int = 8
    # Stage-1 width: the stem and stage 1 have `width` channels (Bottleneck archs: stage-1 mid width; the
    # stage outputs are 4x their mids); each later stage doubles. 16 is the standard for the CIFAR ResNets,
    # 64 for resnet_imagenet (ResNet-50/101/152).
    width: int = 16

    def validate(self, p: str) -> None:
        _check(stage_blocks(self.arch, self.depth) is not None, f"{p}.depth", self.depth,
               f"{p}.arch {self.arch!r} needs {depth_rule(self.arch)}. The archs: "
               + "; ".join(f"{a!r}: {depth_rule(a)}" for a in ARCHS))
        top = MAX_CHANNELS // widest_factor(self.arch)
        _check(1 <= self.width <= top, f"{p}.width", self.width,
               f"must be in [1, {top}] for arch {self.arch!r} (its widest layer has {widest_factor(self.arch)} x width "
               f"channels, at most {MAX_CHANNELS})")


@dataclass(frozen=True)
class RuntimeParams:
    threads: int = 0  # torch intra-op threads per process; 0 = all cores (shared among the processes of a node)
    bf16: bool = False  # bf16 autocast for training forward passes (CPU or CUDA)
    channels_last: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when torch.cuda.is_available(), else cpu
    nproc_per_node: int = 1  # > 1: teacher and distill train with DDP in this many processes (torchrun)

    def validate(self, p: str) -> None:
        _check(self.threads >= 0, f"{p}.threads", self.threads, "must be >= 0 (0 = all cores)")
        _check(1 <= self.nproc_per_node <= 1024, f"{p}.nproc_per_node", self.nproc_per_node,
               "must be in [1, 1024] (1 = one process, no DDP)")


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 4
    batch_size: int = 256
    lr: float = 0.2  # peak learning rate
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_frac: float = 0.2  # onecycle: fraction of steps spent warming up
    label_smoothing: float = 0.0
    eval_every: int = 1  # epochs between test-accuracy points on the curve (0 = only at the end)
    checkpoint_every: int = 1  # epochs between resume checkpoints under checkpoints/ (0 = off)

    def validate(self, p: str) -> None:
        _check(self.epochs >= 1, f"{p}.epochs", self.epochs, "must be >= 1")
        _check(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, "must be >= 1")
        _check(math.isfinite(self.lr) and self.lr > 0, f"{p}.lr", self.lr, "must be > 0")
        _check(0 <= self.momentum < 1, f"{p}.momentum", self.momentum, "must be in [0, 1)")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, "must be >= 0")
        _check(0 <= self.warmup_frac < 1, f"{p}.warmup_frac", self.warmup_frac, "must be in [0, 1)")
        _check(0 <= self.label_smoothing < 1, f"{p}.label_smoothing", self.label_smoothing, "must be in [0, 1)")
        _check(self.eval_every >= 0, f"{p}.eval_every", self.eval_every, "must be >= 0")
        _check(self.checkpoint_every >= 0, f"{p}.checkpoint_every", self.checkpoint_every,
               "must be >= 0 (epochs between resume checkpoints; 0 = off)")


@dataclass(frozen=True)
class PruneParams:
    method: Literal["magnitude", "l1_filter"] = "magnitude"
    ratio: float = 0.8  # magnitude: fraction of prunable weights removed; l1_filter: fraction of inner filters
    include_first_conv: bool = True  # magnitude only: l1_filter never prunes the stem, residual path or fc
    include_last_fc: bool = True
    schedule: Literal["oneshot", "agp"] = "oneshot"  # agp: reach the ratio gradually during recovery
    agp_steps: int = 8  # number of pruning updates of the AGP schedule
    agp_end: float = 0.5  # fraction of the recovery steps by which AGP reaches the target sparsity

    def validate(self, p: str) -> None:
        _check(0 <= self.ratio < 1, f"{p}.ratio", self.ratio,
               "must be in [0, 1) (magnitude: fraction of prunable weights removed; l1_filter: fraction of filters)")
        _check(self.schedule == "oneshot" or self.method == "magnitude", f"{p}.schedule", self.schedule,
               f"'agp' needs {p}.method: magnitude (gradual pruning of masks; l1_filter removes channels once)")
        _check(self.agp_steps >= 1, f"{p}.agp_steps", self.agp_steps, "must be >= 1")
        _check(0 < self.agp_end <= 1, f"{p}.agp_end", self.agp_end, "must be in (0, 1] (fraction of recovery steps)")


@dataclass(frozen=True)
class DistillParams(TrainParams):
    epochs: int = 1
    lr: float = 0.05
    schedule: Literal["onecycle", "cosine", "constant"] = "cosine"
    warmup_frac: float = 0.0
    variants: list[str] = field(default_factory=lambda: ["kd", "finetune"])
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the KD term in kd variants; finetune always uses 0
    at_beta: float = 0.0  # attention-transfer weight (Zagoruyko & Komodakis use 1000) in variants with a teacher

    def validate(self, p: str) -> None:
        super().validate(p)
        _check(len(self.variants) > 0, f"{p}.variants", self.variants, f"must list at least one of {list(VARIANTS)}")
        for v in self.variants:
            _check(v in VARIANTS, f"{p}.variants", self.variants, f"each entry must be one of {list(VARIANTS)}")
        _check(len(set(self.variants)) == len(self.variants), f"{p}.variants", self.variants, "has duplicates")
        _check(math.isfinite(self.temperature) and self.temperature > 0, f"{p}.temperature", self.temperature, "must be > 0")
        _check(0 <= self.alpha <= 1, f"{p}.alpha", self.alpha, "must be in [0, 1]")
        _check(math.isfinite(self.at_beta) and self.at_beta >= 0, f"{p}.at_beta", self.at_beta,
               "must be >= 0 (0 = no attention transfer)")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 1000
    latency_repeats: int = 20  # timed forward passes per model and batch size (median reported); 0 = skip
    onnx: bool = True  # export students to ONNX and check them with onnxruntime (when onnx is installed)

    def validate(self, p: str) -> None:
        _check(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, "must be >= 1")
        _check(self.latency_repeats >= 0, f"{p}.latency_repeats", self.latency_repeats, "must be >= 0 (0 = skip)")


@dataclass(frozen=True)
class MlflowParams:
    enabled: bool = True
    experiment: str = "kdprune"

    def validate(self, p: str) -> None:
        _check(bool(self.experiment.strip()), f"{p}.experiment", self.experiment, "must be a non-empty name")


@dataclass(frozen=True)
class Params:
    seed: int = 0
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)
    teacher: TrainParams = field(default_factory=TrainParams)
    prune: PruneParams = field(default_factory=PruneParams)
    distill: DistillParams = field(default_factory=DistillParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)

    def validate(self, p: str = "") -> None:
        _check(self.seed >= 0, "seed", self.seed, "must be an integer >= 0")
        n = self.runtime.nproc_per_node
        for section in ("teacher", "distill"):  # DDP splits every global batch evenly over the processes
            bs = getattr(self, section).batch_size
            _check(bs % n == 0, f"{section}.batch_size", bs,
                   f"must be divisible by runtime.nproc_per_node = {n} (each process takes batch_size / {n} "
                   "images of every step)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    origin = typing.get_origin(tp)
    if origin is Literal:
        _check(value in typing.get_args(tp), key, value, f"must be {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ParamsError:
                continue
        raise ParamsError(f"params.yaml: {key} = {value!r} is invalid: must be {_type_name(tp)}")
    if origin is list:
        _check(isinstance(value, list), key, value, f"must be {_type_name(tp)}")
        (inner,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is type(None):
        _check(value is None, key, value, "must be null")
        return None
    if tp is bool:
        _check(isinstance(value, bool), key, value, "must be true or false")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "must be an integer")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "must be a number")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, value, "must be a string")
        return value
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, value, "must be a mapping of keys (a section)")
        return _build(tp, value, key)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            where = f"{prefix}.{k}" if prefix else str(k)
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ParamsError(f"params.yaml: unknown key '{where}'{hint} Allowed keys here: {sorted(fields)}")
    kwargs = {}
    for name in fields:
        if name in raw:
            kwargs[name] = _coerce(f"{prefix}.{name}" if prefix else name, raw[name], hints[name])
    obj = cls(**kwargs)
    obj.validate(prefix)
    return obj


REQUIRED_SECTIONS = ("data", "model", "teacher", "prune", "distill")


def params_from_dict(raw: Any) -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: the top level must be a mapping of sections, got {type(raw).__name__}")
    for section in REQUIRED_SECTIONS:
        if section not in raw:
            raise ParamsError(f"params.yaml: missing section '{section}' (required sections: {list(REQUIRED_SECTIONS)})")
    return _build(Params, raw, "")


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the repository root)") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    return params_from_dict(raw)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'prune': {'ratio': 0.9}} -> {'prune.ratio': 0.9}"""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
