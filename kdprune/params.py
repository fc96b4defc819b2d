"""Load and validate ``params.yaml`` into typed dataclasses.

This is the one place that knows what a valid parameter is. Every error names the dotted key,
the bad value and what is allowed, and all of them are raised before any work starts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kdprune.schema import ParamsError, build, check, json_like, safe_load_yaml, show, within  # noqa: F401
from kdprune.archs import ARCHS, MAX_CHANNELS, TORCHVISION_CLASSIFIERS, depth_rule, stage_blocks, widest_factor
from kdprune.io import path_stays_inside, read_regular
from kdprune.workspace import factory_problem

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "imagefolder")  # = kdprune.data.REGISTRY
# + kdprune.data.FOLDER_DATASETS
# model.factory: "package.module:function", identifiers only (no paths, no attribute chains after the colon)
FACTORY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
MAX_FACTORY_CHARS = 200
MAX_KWARGS_ITEMS, MAX_KWARGS_CHARS = 64, 4096  # model.kwargs: a small mapping of scalars and short lists
VARIANTS = ("kd", "finetune", "scratch", "scratch_kd")
PRUNE_METHODS = ("magnitude", "l1_filter", "channel")
IMPORTANCES = ("l1", "l2", "taylor", "bn_scale")
TEACHER_DIR = "teachers"  # imported teacher checkpoints live here: a DVC dependency of train_teacher (dvc.yaml)
MAX_AT_LAYERS = 32


MAX_PARAMS_BYTES = 1 << 20  # params.yaml is a few KB; a larger file is not a params file (or is a YAML bomb)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a cgroup cpuset), else all of them."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def max_threads() -> int:
    """Torch threads allowed per process: 4x this machine's cores. More only adds contention (and 10,000
    threads stall the machine; 100,000 crash torch)."""
    return 4 * (os.cpu_count() or 1)


MAX_SUBSET = 100_000_000  # images: ImageNet-1k has 1.3M, SVHN with extra 604k
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024  # imagefolder: 224 for ImageNet models, 518 for the largest torchvision ones
DEFAULT_IMAGE_SIZE = 224
MAX_MEMORY_BUDGET_MB = 1 << 20  # 1 TiB
MAX_WORKERS = 64


@dataclass(frozen=True)
class DataParams:
    name: Literal["fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "imagefolder"] = "fashion_mnist"
    root: str | None = None  # null: search the Debian package's dir (fashion_mnist), data/raw, then download
    download: bool = True  # allow torchvision's downloader when no local copy is found
    train_subset: int = 0  # 0: the whole split; N > 0: a class-stratified subset of N images
    test_subset: int = 0
    crop_padding: int = 2  # random-crop augmentation: pad by this many pixels, crop back
    svhn_extra: bool = False  # svhn only: append extra_32x32.mat (531k images) to the train split
    # -- image folders (kdprune/data/imagefolder.py, decoded.py, streaming.py), normalisation (data/preprocessing.py)
    image_size: int | None = None  # imagefolder: side of the square images the model sees; null = 224 (DEFAULT_...)
    resize_size: int | None = None  # imagefolder: the shorter side is resized to this, then centre-cropped
    interpolation: Literal["bilinear", "bicubic"] | None = None  # imagefolder: of that resize; null = bilinear
    mean: list[float] | None = None  # per channel, in [0, 1] pixel units; null = computed from the train split
    std: list[float] | None = None
    loader: Literal["auto", "tensor", "stream"] = "auto"  # imagefolder: auto = tensor when it fits the budget
    memory_budget_mb: int = 4096  # decoded train + val above this -> stream (auto) or an error (tensor)
    num_workers: int | None = None  # imagefolder prepare: decoding processes; null = min(8, cores); 0 = in the main one

    @property
    def image_size_or_default(self) -> int:
        return DEFAULT_IMAGE_SIZE if self.image_size is None else self.image_size

    def validate_folder(self, p: str) -> None:
        folder = self.name == "imagefolder"
        for key in ("image_size", "resize_size"):  # (interpolation below)
            check(folder or getattr(self, key) is None, f"{p}.{key}", getattr(self, key),
                   f"applies to {p}.name = imagefolder only (the size of {self.name!r} is fixed); set it to null")
        check(folder or self.interpolation is None, f"{p}.interpolation", self.interpolation,
               f"applies to {p}.name = imagefolder only; set it to null")
        check(folder or self.loader != "stream", f"{p}.loader", self.loader,
               f"stream applies to {p}.name = imagefolder only ({self.name!r} is always tensor-resident); "
               "use auto or tensor")
        if folder:
            check(self.root is not None, f"{p}.root", self.root,
                   f"{p}.name = imagefolder needs {p}.root: a directory holding train/<class>/* and val/<class>/*")
        check(self.image_size is None or within(MIN_IMAGE_SIZE, self.image_size, MAX_IMAGE_SIZE), f"{p}.image_size",
               self.image_size, f"must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] pixels, or null "
               f"({DEFAULT_IMAGE_SIZE})")
        crop = self.image_size_or_default
        check(self.resize_size is None or within(crop, self.resize_size, 2 * crop), f"{p}.resize_size",
               self.resize_size, f"must be in [{p}.image_size, 2 x {p}.image_size] = [{crop}, {2 * crop}] (the "
               f"centre crop must fit in the resized image), or null (= {p}.image_size)")
        for key, lo, hi, what in (("mean", 0.0, 1.0, "[0, 1]"), ("std", 1e-3, 1.0, "[0.001, 1]")):
            v = getattr(self, key)
            check(v is None or (len(v) in (1, 3) and all(within(lo, x, hi) for x in v)), f"{p}.{key}", v,
                   f"must be null (computed from the train split) or a list of 1 or 3 numbers (one per channel) in "
                   f"{what}, in [0, 1] pixel units (ImageNet: mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225])")
        check(self.mean is None or self.std is None or len(self.mean) == len(self.std), f"{p}.std", self.std,
               f"must have as many values as {p}.mean ({len(self.mean or [])}), one per channel")
        check(within(1, self.memory_budget_mb, MAX_MEMORY_BUDGET_MB), f"{p}.memory_budget_mb", self.memory_budget_mb,
               f"must be in [1, {MAX_MEMORY_BUDGET_MB:,}] MiB")
        check(self.num_workers is None or within(0, self.num_workers, MAX_WORKERS), f"{p}.num_workers",
               self.num_workers, f"must be in [0, {MAX_WORKERS}] (0 = decode in the main process), or null "
               f"(min(8, cores))")

    def validate(self, p: str) -> None:
        if self.root is not None:
            check(bool(self.root.strip()), f"{p}.root", self.root, "must be a directory path or null")
            check(len(self.root) <= 4096 and "\x00" not in self.root, f"{p}.root", self.root,
                   "must be a path of at most 4096 characters, without NUL bytes")
            check(path_stays_inside(self.root), f"{p}.root", self.root,
                   "a relative path must stay inside the repository (no '..' out of it, no symlink "
                   "to a directory outside it); "
                   "write an absolute path to use a directory elsewhere")
        for key in ("train_subset", "test_subset"):
            check(within(0, getattr(self, key), MAX_SUBSET), f"{p}.{key}", getattr(self, key),
                   f"must be in [0, {MAX_SUBSET:,}] (0 = the whole split; no supported dataset is larger)")
        check(0 <= self.crop_padding <= 8, f"{p}.crop_padding", self.crop_padding, "must be in [0, 8]")
        check(not self.svhn_extra or self.name == "svhn", f"{p}.svhn_extra", self.svhn_extra,
               f"applies to {p}.name = svhn only (it is {self.name!r}); set it to false")
        self.validate_folder(p)


@dataclass(frozen=True)
class ModelParams:
    arch: Literal["resnet", "resnet_bottleneck", "resnet_imagenet", "torchvision", "custom"] = "resnet"
    depth: int = 8
    # Stage-1 width: the stem and stage 1 have `width` channels (Bottleneck archs: stage-1 mid width; the stage
    # outputs are 4x their mids); each later stage doubles. 16: the CIFAR ResNets, 64: resnet_imagenet.
    width: int = 16
    name: str | None = None  # arch torchvision: the builder, e.g. resnet18 (TORCHVISION_CLASSIFIERS)
    factory: str | None = None  # arch custom: "package.module:function" returning an nn.Module (runs user code)
    kwargs: dict = field(default_factory=dict)  # arch custom: keyword arguments of the factory
    # arch custom: a factory outside the repository (an installed package, torch.hub:load) RUNS ITS CODE; opt in
    allow_external_factory: bool = False

    def validate(self, p: str) -> None:
        if self.arch == "torchvision":
            check(self.name in TORCHVISION_CLASSIFIERS, f"{p}.name", self.name,
                   f"{p}.arch torchvision needs a classification builder of torchvision.models; one of: "
                   + ", ".join(TORCHVISION_CLASSIFIERS))
        else:
            check(self.name is None, f"{p}.name", self.name, f"applies to {p}.arch: torchvision only; set it to null")
        if self.arch == "custom":
            check(isinstance(self.factory, str) and len(self.factory) <= MAX_FACTORY_CHARS
                   and FACTORY_RE.fullmatch(self.factory) is not None, f"{p}.factory", self.factory,
                   f"{p}.arch custom needs \"package.module:function\" (Python identifiers only, at most "
                   f"{MAX_FACTORY_CHARS} characters), a function that returns an nn.Module")
            problem = factory_problem(self.factory, self.allow_external_factory)  # finds the file, imports nothing
            check(problem is None, f"{p}.factory", self.factory, problem or "")
        else:
            check(self.factory is None, f"{p}.factory", self.factory,
                   f"applies to {p}.arch: custom only; set it to null")
            check(not self.kwargs, f"{p}.kwargs", self.kwargs, f"applies to {p}.arch: custom only; set it to {{}}")
            check(not self.allow_external_factory, f"{p}.allow_external_factory", self.allow_external_factory,
                   f"applies to {p}.arch: custom only; set it to false")
        check(len(self.kwargs) <= MAX_KWARGS_ITEMS
               and all(isinstance(k, str) and k.isidentifier() for k in self.kwargs)
               and all(json_like(v) for v in self.kwargs.values())
               and len(json.dumps(self.kwargs)) <= MAX_KWARGS_CHARS, f"{p}.kwargs", self.kwargs,
               f"must be a mapping of at most {MAX_KWARGS_ITEMS} identifier keys to null, true/false, numbers, strings "
               f"or short lists of them ({MAX_KWARGS_CHARS} characters as JSON at most)")
        check(not {"num_classes", "in_channels"} & set(self.kwargs), f"{p}.kwargs", self.kwargs,
               "must not set num_classes or in_channels: kdprune passes them from the data")
        if self.arch not in ARCHS:
            return  # depth and width describe the zoo only
        check(stage_blocks(self.arch, self.depth) is not None, f"{p}.depth", self.depth,
               f"{p}.arch {self.arch!r} needs {depth_rule(self.arch)}. The archs: "
               + "; ".join(f"{a!r}: {depth_rule(a)}" for a in ARCHS))
        top = MAX_CHANNELS // widest_factor(self.arch)
        check(1 <= self.width <= top, f"{p}.width", self.width,
               f"must be in [1, {top}] for arch {self.arch!r} (its widest layer has {widest_factor(self.arch)} x width "
               f"channels, at most {MAX_CHANNELS})")


@dataclass(frozen=True)
class RuntimeParams:
    threads: int = 0  # torch intra-op threads per process; 0 = all cores (shared among the processes of a node)
    bf16: bool | Literal["auto"] = "auto"  # bf16 autocast for training; auto: where the hardware has bf16
    channels_last: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when torch.cuda.is_available(), else cpu
    deterministic: bool = True  # CUDA only: bit-identical runs (no cuDNN benchmarking, deterministic kernels)
    nproc_per_node: int = 1  # > 1: teacher and distill train with DDP in this many processes (torchrun)
    # --- multi-node DDP (torchrun's c10d rendezvous; kdprune/train/distributed.py) ---
    nnodes: int = 1  # machines in one training job, each running the stage with the same params
    rdzv_endpoint: str = ""  # "host:port" every node reaches (e.g. node 0); "" = torchrun's env or one node

    def validate(self, p: str) -> None:
        top = max_threads()
        check(within(0, self.threads, top), f"{p}.threads", self.threads,
               f"must be in [0, {top}] (0 = all cores; at most 4x this machine's {os.cpu_count() or 1} cores: "
               "more threads only contend, and thousands stall the machine)")
        check(1 <= self.nproc_per_node <= 1024, f"{p}.nproc_per_node", self.nproc_per_node,
               "must be in [1, 1024] (1 = one process, no DDP)")
        cores = usable_cores()
        check(self.nproc_per_node <= cores, f"{p}.nproc_per_node", self.nproc_per_node,
               f"must be at most this machine's {cores} usable cores (each DDP process, CPU or GPU, needs a core of "
               "its own; more only contend for them, and every process holds its own copy of the model and data)")
        # 1024 nodes x 1024 processes bounds the world size (and the batch-size divisibility check) at 2^20
        check(1 <= self.nnodes <= MAX_NODES, f"{p}.nnodes", self.nnodes,
               f"must be in [1, {MAX_NODES}] (1 = this machine only)")
        check(self.rdzv_endpoint == "" or valid_endpoint(self.rdzv_endpoint), f"{p}.rdzv_endpoint",
               self.rdzv_endpoint, "must be '' or 'host:port': a hostname (letters, digits, '-', '.'), an IPv4 address "
               "or a bracketed IPv6 address, and a port in [1, 65535]")

    @property
    def world(self) -> int:
        """DDP processes over all nodes (Python ints: at most 2^20)."""
        return int(self.nnodes) * int(self.nproc_per_node)


MAX_NODES = 1024
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ENDPOINT = re.compile(rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[[0-9A-Fa-f:.]{{2,45}}\]):([0-9]{{1,5}})")


def valid_endpoint(text: str) -> bool:
    """``host:port`` for torchrun's ``--rdzv-endpoint``: it travels as one argv item (never through a shell),
    and this keeps it to a hostname / IP and a port in [1, 65535]."""
    m = _ENDPOINT.fullmatch(text) if isinstance(text, str) and len(text) <= 260 and text.isascii() else None
    return m is not None and 1 <= int(m.group(1)) <= 65535


MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 0.1
MAX_MIN_LAYER_DENSITY = 0.5  # prune.min_layer_density: a layer floor above half its weights is not pruning it


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
        check(within(1, self.epochs, MAX_EPOCHS), f"{p}.epochs", self.epochs, f"must be in [1, {MAX_EPOCHS}]")
        check(within(1, self.batch_size, MAX_BATCH), f"{p}.batch_size", self.batch_size,
               f"must be in [1, {MAX_BATCH}]")
        check(0 < self.lr <= MAX_LR, f"{p}.lr", self.lr,
               f"must be in (0, {MAX_LR}] (peak SGD learning rate; larger ones diverge to NaN)")
        check(0 <= self.momentum < 1, f"{p}.momentum", self.momentum, "must be in [0, 1)")
        check(within(0, self.weight_decay, MAX_WEIGHT_DECAY), f"{p}.weight_decay", self.weight_decay,
               f"must be in [0, {MAX_WEIGHT_DECAY}] (typical: 1e-4 to 5e-4; larger ones shrink every weight to 0 "
               "or diverge)")
        check(0 <= self.warmup_frac < 1, f"{p}.warmup_frac", self.warmup_frac, "must be in [0, 1)")
        check(0 <= self.label_smoothing < 1, f"{p}.label_smoothing", self.label_smoothing, "must be in [0, 1)")
        check(within(0, self.eval_every, MAX_EPOCHS), f"{p}.eval_every", self.eval_every,
               f"must be in [0, {MAX_EPOCHS}] (0 = only at the end)")
        check(within(0, self.checkpoint_every, MAX_EPOCHS), f"{p}.checkpoint_every", self.checkpoint_every,
               f"must be in [0, {MAX_EPOCHS}] (epochs between resume checkpoints; 0 = off)")


@dataclass(frozen=True)
class PruneParams:
    method: Literal["magnitude", "l1_filter", "channel"] = "magnitude"
    ratio: float = 0.8  # fraction removed: of prunable weights (magnitude), inner filters (l1_filter), channels
    importance: Literal["l1", "l2", "taylor", "bn_scale"] = "l1"  # channel: how channels are ranked
    target_macs_reduction: float | None = None  # channel: prune in steps until MACs fall by this factor (not ratio)
    include_first_conv: bool = True  # magnitude only: l1_filter never prunes the stem, residual path or fc
    include_last_fc: bool = True
    min_layer_density: float = 0.0  # magnitude only: every prunable layer keeps at least this fraction of its weights
    schedule: Literal["oneshot", "agp"] = "oneshot"  # agp: reach the ratio gradually during recovery
    agp_steps: int = 8  # number of pruning updates of the AGP schedule
    agp_end: float = 0.5  # fraction of the recovery steps by which AGP reaches the target sparsity

    def validate(self, p: str) -> None:
        check(0 <= self.ratio < 1, f"{p}.ratio", self.ratio,
               "must be in [0, 1) (magnitude: fraction of prunable weights removed; l1_filter: fraction of filters)")
        check(within(0, self.min_layer_density, MAX_MIN_LAYER_DENSITY), f"{p}.min_layer_density", self.min_layer_density,
               f"must be in [0, {MAX_MIN_LAYER_DENSITY}] (the fraction of its weights every prunable layer keeps; "
               "0 = only its largest one)")
        if self.min_layer_density > 0:
            check(self.method == "magnitude", f"{p}.min_layer_density", self.min_layer_density,
                   f"applies to {p}.method: magnitude only (l1_filter and channel keep every layer's structure); "
                   "set it to 0")
            check(self.min_layer_density <= 1 - self.ratio, f"{p}.min_layer_density", self.min_layer_density,
                   f"must be at most 1 - {p}.ratio = {1 - self.ratio:g}: the floors alone would keep more weights than "
                   f"ratio {self.ratio:g} leaves")
        check(self.schedule == "oneshot" or self.method == "magnitude", f"{p}.schedule", self.schedule,
               f"'agp' needs {p}.method: magnitude (gradual pruning of masks; l1_filter and channel remove "
               "channels once)")
        if self.target_macs_reduction is not None:
            check(self.method == "channel", f"{p}.target_macs_reduction", self.target_macs_reduction,
                   f"applies to {p}.method: channel only; set it to null")
            check(1 < self.target_macs_reduction <= 100, f"{p}.target_macs_reduction", self.target_macs_reduction,
                   "must be in (1, 100] (the factor by which the MACs fall, e.g. 2.0; null = use prune.ratio)")
        check(within(1, self.agp_steps, 10_000), f"{p}.agp_steps", self.agp_steps, "must be in [1, 10000]")
        check(0 < self.agp_end <= 1, f"{p}.agp_end", self.agp_end, "must be in (0, 1] (fraction of recovery steps)")


def teacher_path_problem(path: str) -> str | None:
    """Why ``path`` is not an allowed ``teacher.checkpoint`` (None when it is): a relative path to a file inside
    ``teachers/``, also after resolving symbolic links (a link may not lead out of it)."""
    if not path or len(path) > 4096 or "\x00" in path:
        return "must be a path of at most 4096 characters, without NUL bytes"
    p = Path(path)
    root = Path(TEACHER_DIR).resolve()
    if p.is_absolute() or not p.parts or p.parts[0] != TEACHER_DIR or ".." in p.parts:
        return (f"must be a relative path inside {TEACHER_DIR}/ (e.g. {TEACHER_DIR}/model.pt): copy your checkpoint "
                f"there and commit it (or `dvc add` it when large), so it is a DVC dependency of the teacher stage")
    real = p.resolve()
    if real == root or not real.is_relative_to(root):
        return f"resolves to {real}, outside {TEACHER_DIR}/ (a symbolic link may not lead out of it)"
    return None


@dataclass(frozen=True)
class TeacherParams(TrainParams):
    init: Literal["scratch", "checkpoint", "pretrained"] = "scratch"  # where the teacher's weights come from
    checkpoint: str | None = None  # init checkpoint: a file inside teachers/ (state_dict or kdprune checkpoint)

    def validate(self, p: str) -> None:
        if self.init != "scratch" and self.epochs == 0:  # 0 epochs: measure the imported teacher as it is
            TrainParams.validate(dataclasses.replace(self, epochs=1), p)
        else:
            check(within(1, self.epochs, MAX_EPOCHS), f"{p}.epochs", self.epochs,
                   f"must be in [1, {MAX_EPOCHS}] ({p}.epochs: 0 is allowed only with {p}.init checkpoint or "
                   "pretrained)")
            super().validate(p)
        if self.init == "checkpoint":
            check(self.checkpoint is not None, f"{p}.checkpoint", self.checkpoint,
                   f"{p}.init checkpoint needs the file to load, a path inside {TEACHER_DIR}/")
            problem = teacher_path_problem(self.checkpoint)
            check(problem is None, f"{p}.checkpoint", self.checkpoint, problem or "")
        else:
            check(self.checkpoint is None, f"{p}.checkpoint", self.checkpoint,
                   f"applies to {p}.init: checkpoint only; set it to null")


MIN_TEMPERATURE, MAX_TEMPERATURE = 0.1, 100.0
MAX_AT_BETA = 1e5


@dataclass(frozen=True)
class DistillParams(TrainParams):
    epochs: int = 1
    lr: float = 0.05
    schedule: Literal["onecycle", "cosine", "constant"] = "cosine"
    warmup_frac: float = 0.0
    variants: list[str] = field(default_factory=lambda: ["kd", "finetune"])
    finetune_lr: float | None = None  # the finetune variant's own peak learning rate; None = lr
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the KD term in kd variants; finetune always uses 0
    at_beta: float = 0.0  # attention-transfer weight (Zagoruyko & Komodakis use 1000) in variants with a teacher
    at_layers: list[str] = field(default_factory=list)  # module names whose outputs attention transfer compares;
    # [] = the zoo's residual stages (torchvision and custom models must name theirs)

    def validate(self, p: str) -> None:
        super().validate(p)
        check(len(self.variants) > 0, f"{p}.variants", self.variants, f"must list at least one of {list(VARIANTS)}")
        for v in self.variants:
            check(v in VARIANTS, f"{p}.variants", self.variants, f"each entry must be one of {list(VARIANTS)}")
        check(len(set(self.variants)) == len(self.variants), f"{p}.variants", self.variants, "has duplicates")
        if self.finetune_lr is not None:
            check(0 < self.finetune_lr <= MAX_LR, f"{p}.finetune_lr", self.finetune_lr, f"must be null (= {p}.lr) or "
                   f"in (0, {MAX_LR}] (the finetune variant's peak SGD learning rate)")
            check("finetune" in self.variants, f"{p}.finetune_lr", self.finetune_lr, "applies to the finetune "
                   f"variant, which {p}.variants does not list; set it to null")
        check(within(MIN_TEMPERATURE, self.temperature, MAX_TEMPERATURE), f"{p}.temperature", self.temperature,
               f"must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}] (Hinton et al. use 1-20; near 0 the softened "
               "logits overflow to NaN, and the KD term is scaled by T^2)")
        check(within(0, self.alpha, 1), f"{p}.alpha", self.alpha, "must be in [0, 1]")
        check(within(0, self.at_beta, MAX_AT_BETA), f"{p}.at_beta", self.at_beta,
               f"must be in [0, {MAX_AT_BETA:.0f}] (0 = no attention transfer; Zagoruyko & Komodakis use 1000)")
        check(len(self.at_layers) <= MAX_AT_LAYERS and len(set(self.at_layers)) == len(self.at_layers)
               and all(0 < len(n) <= 200 and re.fullmatch(r"[A-Za-z0-9_.]+", n) for n in self.at_layers),
               f"{p}.at_layers", self.at_layers,
               f"must list at most {MAX_AT_LAYERS} distinct module names (as model.named_modules() spells them, "
               "e.g. layer3 or features.6)")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 1000
    latency_repeats: int = 20  # timed forward passes per model and batch size (median reported); 0 = skip
    onnx: bool = True  # export students to ONNX and check them with onnxruntime (when onnx is installed)

    def validate(self, p: str) -> None:
        check(within(1, self.batch_size, MAX_BATCH), f"{p}.batch_size", self.batch_size, f"must be in [1, {MAX_BATCH}]")
        check(within(0, self.latency_repeats, 10_000), f"{p}.latency_repeats", self.latency_repeats,
               "must be in [0, 10000] (0 = skip)")


QUANTIZE_METHODS = ("none", "ptq", "qat")
MAX_CALIBRATION_IMAGES = 100_000


@dataclass(frozen=True)
class QuantizeParams:
    method: Literal["none", "ptq", "qat"] = "ptq"  # none | ptq: ORT static INT8 | qat: recovery with fake quantization
    calibration_images: int = 512  # training images (eval transforms) that set the INT8 activation ranges

    def validate(self, p: str) -> None:
        check(within(1, self.calibration_images, MAX_CALIBRATION_IMAGES), f"{p}.calibration_images",
               self.calibration_images, f"must be an integer in [1, {MAX_CALIBRATION_IMAGES}]")


@dataclass(frozen=True)
class MlflowParams:
    enabled: bool = True
    experiment: str = "kdprune"

    def validate(self, p: str) -> None:
        check(bool(self.experiment.strip()) and len(self.experiment) <= 200 and self.experiment.isprintable(),
               f"{p}.experiment", self.experiment, "must be a non-empty name of at most 200 printable characters")


MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Params:
    seed: int = 0
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    prune: PruneParams = field(default_factory=PruneParams)
    distill: DistillParams = field(default_factory=DistillParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    quantize: QuantizeParams = field(default_factory=QuantizeParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)

    def validate(self, p: str = "") -> None:
        check(within(0, self.seed, MAX_SEED), "seed", self.seed,
               f"must be an integer in [0, {MAX_SEED}] (numpy's seed range: 2^32 - 1)")
        n = self.runtime.world
        what = (f"runtime.nproc_per_node = {n}" if self.runtime.nnodes == 1 else
                f"runtime.nnodes x runtime.nproc_per_node = {n}")
        for section in ("teacher", "distill"):  # DDP splits every global batch evenly over the processes
            bs = getattr(self, section).batch_size
            check(bs % n == 0, f"{section}.batch_size", bs,
                   f"must be divisible by {what} (each process takes batch_size / {n} images of every step)")
        check(self.quantize.method == "none" or self.evaluate.onnx, "quantize.method", self.quantize.method,
               "needs evaluate.onnx: true (the INT8 model is made from the ONNX export), or quantize.method: none")
        if self.teacher.init == "pretrained":
            check(self.model.arch == "torchvision", "teacher.init", self.teacher.init,
                   f"'pretrained' needs model.arch: torchvision (torchvision's weights); model.arch is "
                   f"{self.model.arch!r}")
        if self.distill.at_beta > 0 and self.model.arch not in ARCHS:
            check(bool(self.distill.at_layers), "distill.at_layers", self.distill.at_layers,
                   f"distill.at_beta > 0 with model.arch {self.model.arch} needs the module names whose outputs "
                   "attention transfer compares (e.g. [layer2, layer3] for torchvision's resnet18)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REQUIRED_SECTIONS = ("data", "model", "teacher", "prune", "distill")


def params_from_dict(raw: Any) -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: the top level must be a mapping of sections, got {type(raw).__name__}")
    for section in REQUIRED_SECTIONS:
        if section not in raw:
            raise ParamsError(f"params.yaml: missing section '{section}' (required sections: {list(REQUIRED_SECTIONS)})")
    return build(Params, raw, "")


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:  # a regular file (a FIFO would hang, /dev/zero never ends), read with its size bound
        raw = safe_load_yaml(read_regular(path, "a params file", MAX_PARAMS_BYTES, ParamsError,
                                          missing="file not found (run from the repository root)").decode())
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise ParamsError(f"{path}: not valid YAML: {str(e)[:500]}") from None
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
