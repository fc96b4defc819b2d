"""The model zoo: ResNets for 32x32 (CIFAR-style) inputs, all with a 3x3 stride-1 stem, no max-pool,
stages whose first block halves the resolution (except stage 1), global average pooling and one fc.

``model.arch`` (params.yaml) picks the family, ``model.depth`` the member (kdprune.archs.ARCHS; torchvision
and custom models: kdprune/models/__init__.py):

- ``resnet``: BasicBlock (two 3x3 convs), three stages of widths w, 2w, 4w, depth 6n+2
  (He et al. 2016, section 4.2: ResNet-20/32/44/56/110). The stem has w channels and is coupled to
  stage 1 through the identity shortcut of its first block.
- ``resnet_bottleneck``: Bottleneck (1x1 reduce, 3x3, 1x1 expand x4), three stages with mid widths
  w, 2w, 4w (outputs 4w, 8w, 16w), a stem of w channels, depth 9n+2 (ResNet-164 at n = 18). He et al.'s
  "Identity mappings" ResNet-164 is pre-activation; ours is post-activation (conv-BN-ReLU, ReLU after
  the addition) like the BasicBlock nets; the BNs move, so the parameter count differs by under a
  thousand (1.7M either way).
- ``resnet_imagenet``: the four Bottleneck stages of the ImageNet ResNet-50/101/152 (He et al. 2016,
  Table 1: [3, 4, 6, 3], [3, 4, 23, 3], [3, 8, 36, 3] blocks) with mid widths w, 2w, 4w, 8w (outputs x4)
  and strides 1, 2, 2, 2, but the CIFAR stem: a 3x3 conv of w channels instead of 7x7/2 + max-pool.
  w = 64 is the standard net; other widths scale every layer proportionally.

All shortcuts are identities except the first block of a stage, which has a projection shortcut
(1x1 conv + BN, "option B"): in every stage of the Bottleneck archs, in stages 2.. of ``resnet``.
The stride sits on the first 3x3 conv of a block (torchvision's "ResNet v1.5"). Convs have no bias;
init is Kaiming-normal (fan_out) for convs, BN weight 1 and bias 0, PyTorch's default for the fc.

Parameter counts (measured; tests/models/test_models.py checks them against closed forms):

    ============================  ===========  ============  ===========
    model (3 input channels)      width        10 classes    100 classes
    ============================  ===========  ============  ===========
    resnet 20                     16              272,474       278,324
    resnet 56                     16              855,770       861,620
    resnet 110                    16            1,730,714     1,736,564
    resnet_bottleneck 164         16            1,704,154     1,727,284
    resnet_imagenet 152           64           58,156,618    58,341,028
    ============================  ===========  ============  ===========

torchvision's resnet152 has 60,192,808 parameters at 1000 classes; the CIFAR stem saves
64 * 3 * (49 - 9) = 7,680 and the fc at 100 classes another 1,844,100: 58,341,028 exactly.

A model is fully described by its *spec*, a plain dict that a checkpoint stores next to the
state_dict (kdprune.io). The spec holds every per-layer channel count, so a physically pruned model
(fewer channels, e.g. after Torch-Pruning) is rebuilt from its checkpoint without the original module
ever being pickled::

    {"arch": "resnet", "depth": 8, "in_channels": 1, "num_classes": 10,
     "channels": {"stages": [16, 32, 64],              # output channels of each stage
                  "mids": [[16], [32], [64]]}}         # per stage, per block: conv1's output channels

    {"arch": "resnet_bottleneck", "depth": 20, "in_channels": 3, "num_classes": 10,
     "channels": {"stem": 16,                          # stem conv's output channels
                  "stages": [64, 128, 256],
                  "mids": [[[16, 16], [16, 16]],       # per block: [conv1 out, conv2 out]
                           [[32, 32], [32, 32]],
                           [[64, 64], [64, 64]]]}}

    {"arch": "resnet_imagenet", "depth": 50, "in_channels": 3, "num_classes": 100,
     "channels": {"stem": 64, "stages": [256, 512, 1024, 2048],
                  "mids": [[[64, 64]] * 3, [[128, 128]] * 4, [[256, 256]] * 6, [[512, 512]] * 3]}}

``depth`` must match the number of blocks (kdprune.archs.stage_blocks); the number of stages is the
arch's. The ``resnet`` spec has no ``stem``: its stem width is ``stages[0]``. This is the format that
the first checkpoints were written in, so they still load. Channel counts shrink independently
wherever dependency-aware pruning can shrink them: each block's mid widths, each stage's output (all
the blocks of a stage share it through the residual additions) and, in the Bottleneck archs, the stem.

``model.spec`` is read from the modules as they are now (:func:`spec_of`), so saving a model that was
pruned in place stores its new channel counts.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprune.archs import ARCHS, depth_rule, stage_blocks

BOTTLENECK_ARCHS = ("resnet_bottleneck", "resnet_imagenet")
SPEC_KEYS = ("arch", "depth", "in_channels", "num_classes", "channels")
# Most parameters a spec may describe, checked (with Python ints) before anything is allocated: 1 GB of fp32
# weights, 4x the largest net of the zoo's table (ResNet-152 layout at width 64, 58M); training needs about
# 4x the weights again (gradients, momentum, the teacher). A file whose spec asks for more is refused
# instead of being allocated.
MAX_PARAMS = 250_000_000


def _projection(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convs, the stride on the first; ``project=None``: a projection where the shape changes."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int, project: bool | None = None):
        super().__init__()
        if project is None:
            project = stride != 1 or in_ch != out_ch
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = _projection(in_ch, out_ch, stride) if project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 (in -> mids[0]), 3x3 with the stride (mids[0] -> mids[1]), 1x1 (mids[1] -> out); post-activation."""

    def __init__(self, in_ch: int, mids: list[int], out_ch: int, stride: int, project: bool):
        super().__init__()
        m1, m2 = mids
        self.conv1 = nn.Conv2d(in_ch, m1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(m1)
        self.conv2 = nn.Conv2d(m1, m2, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(m2)
        self.conv3 = nn.Conv2d(m2, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = _projection(in_ch, out_ch, stride) if project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Every arch of the zoo; the modules are ``conv1``, ``bn1`` (stem), ``layer1`` .. ``layerN``, ``fc``."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        check_spec(spec)
        self.arch: str = spec["arch"]
        self.depth: int = spec["depth"]
        bottleneck = self.arch in BOTTLENECK_ARCHS
        ch = spec["channels"]
        stage_ch: list[int] = ch["stages"]
        stem = ch["stem"] if bottleneck else stage_ch[0]
        self.conv1 = nn.Conv2d(spec["in_channels"], stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        in_ch = stem
        for s, (out_ch, stage_mids) in enumerate(zip(stage_ch, ch["mids"])):
            blocks = []
            for b, mid in enumerate(stage_mids):
                stride = 2 if (s > 0 and b == 0) else 1
                # The projection's place is structural, never inferred from channel counts, which pruning changes.
                project = b == 0 and (s > 0 or bottleneck)
                if bottleneck:
                    blocks.append(Bottleneck(in_ch, list(mid), out_ch, stride, project))
                else:
                    blocks.append(BasicBlock(in_ch, mid, out_ch, stride, project))
                in_ch = out_ch
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.num_stages = len(stage_ch)
        self.fc = nn.Linear(in_ch, spec["num_classes"])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i}") for i in range(1, self.num_stages + 1)]

    @property
    def spec(self) -> dict[str, Any]:
        """The spec of the modules as they are now (after in-place pruning too): see :func:`spec_of`."""
        return spec_of(self)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits; with ``return_features``, ``(logits, [the output of each stage])``."""
        x = F.relu(self.bn1(self.conv1(x)))
        features = []
        for layer in self.stages:
            x = layer(x)
            features.append(x)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        if return_features:
            return logits, features
        return logits


def _arch_list() -> str:
    return "; ".join(f"{a!r}: {depth_rule(a)}" for a in ARCHS)


def check_spec(spec: Any) -> None:
    """Raise ValueError naming the first thing in ``spec`` that does not describe a model of the zoo, or
    one of more than :data:`MAX_PARAMS` parameters. Allocates nothing: every loader runs it on an untrusted
    spec (a checkpoint's, a compact file's) before it builds the model."""
    if not isinstance(spec, dict):
        raise ValueError(f"a model spec must be a dict, got {type(spec).__name__}")
    arch = spec.get("arch")
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"unknown model arch {arch!r}; available: {_arch_list()}")
    if set(spec) != set(SPEC_KEYS):
        raise ValueError(f"spec of arch {arch!r} has keys {sorted(map(str, spec))}; expected {sorted(SPEC_KEYS)}")

    def positive(value: Any, where: str) -> None:
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"spec {where} = {value!r}: must be an integer >= 1")

    for key in ("depth", "in_channels", "num_classes"):
        positive(spec[key], key)
    blocks = stage_blocks(arch, spec["depth"])
    if blocks is None:
        raise ValueError(f"spec depth = {spec['depth']}: arch {arch!r} needs {depth_rule(arch)}")
    bottleneck = arch in BOTTLENECK_ARCHS
    ch = spec["channels"]
    keys = ["stem", "stages", "mids"] if bottleneck else ["stages", "mids"]
    if not isinstance(ch, dict) or set(ch) != set(keys):
        got = sorted(map(str, ch)) if isinstance(ch, dict) else repr(ch)
        raise ValueError(f"spec channels of arch {arch!r} has keys {got}; expected {keys}")
    if bottleneck:
        positive(ch["stem"], "channels.stem")
    stages, mids = ch["stages"], ch["mids"]
    if not isinstance(stages, (list, tuple)) or len(stages) != len(blocks):
        raise ValueError(f"spec channels.stages = {stages!r}: arch {arch!r} has {len(blocks)} stages")
    seq = (list, tuple)
    counts = [len(m) if isinstance(m, seq) else None for m in mids] if isinstance(mids, seq) else None
    if counts != blocks:
        raise ValueError(f"spec channels.mids: depth {spec['depth']} of arch {arch!r} has {blocks} blocks per stage")
    for s, (out, stage_mids) in enumerate(zip(stages, mids)):
        positive(out, f"channels.stages[{s}]")
        for b, mid in enumerate(stage_mids):
            where = f"channels.mids[{s}][{b}]"
            if bottleneck:
                if not isinstance(mid, (list, tuple)) or len(mid) != 2:
                    raise ValueError(f"spec {where} = {mid!r}: a Bottleneck block needs [conv1 out, conv2 out]")
                positive(mid[0], f"{where}[0]")
                positive(mid[1], f"{where}[1]")
            else:
                positive(mid, where)
    n = spec_param_count(spec)
    if n > MAX_PARAMS:
        raise ValueError(f"spec of arch {arch!r} depth {spec['depth']} has {n:,} parameters, more than "
                         f"the {MAX_PARAMS:,} allowed (kdprune.models.MAX_PARAMS)")


def spec_param_count(spec: dict[str, Any]) -> int:
    """The parameters of ``build_model(spec)``, counted from the spec's structure (checked by
    :func:`check_spec`) with Python ints, so an absurd spec is measured before any allocation."""
    bottleneck = spec["arch"] in BOTTLENECK_ARCHS
    ch = spec["channels"]
    stem = ch["stem"] if bottleneck else ch["stages"][0]
    n = 9 * spec["in_channels"] * stem + 2 * stem  # stem conv + BN
    in_ch = stem
    for s, (out, stage_mids) in enumerate(zip(ch["stages"], ch["mids"])):
        for b, mid in enumerate(stage_mids):
            if b == 0 and (s > 0 or bottleneck):  # projection shortcut: 1x1 conv + BN
                n += in_ch * out + 2 * out
            if bottleneck:
                m1, m2 = mid
                n += in_ch * m1 + 2 * m1 + 9 * m1 * m2 + 2 * m2 + m2 * out + 2 * out
            else:
                n += 9 * in_ch * mid + 2 * mid + 9 * mid * out + 2 * out
            in_ch = out
    return n + in_ch * spec["num_classes"] + spec["num_classes"]  # fc


def spec_width(spec: dict[str, Any]) -> int:
    """``model.width`` of an unpruned model: its stem's output channels (= its stage-1 (mid) width)."""
    ch = spec["channels"]
    return ch["stem"] if spec["arch"] in BOTTLENECK_ARCHS else ch["stages"][0]


def model_spec(arch: str, depth: int, width: int, in_channels: int, num_classes: int) -> dict[str, Any]:
    """Spec of an unpruned ``arch`` of ``depth`` whose stage 1 (mid) width and stem width are ``width``."""
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"unknown model arch {arch!r}; available: {_arch_list()}")
    blocks = stage_blocks(arch, depth)
    if blocks is None:
        raise ValueError(f"model.depth = {depth}: arch {arch!r} needs {depth_rule(arch)}")
    if not (isinstance(width, int) and width >= 1):
        raise ValueError(f"model.width = {width!r}: must be an integer >= 1")
    widths = [width * 2 ** s for s in range(len(blocks))]
    if arch in BOTTLENECK_ARCHS:
        channels = {"stem": width, "stages": [4 * w for w in widths],
                    "mids": [[[w, w] for _ in range(n)] for w, n in zip(widths, blocks)]}
    else:
        channels = {"stages": widths, "mids": [[w] * n for w, n in zip(widths, blocks)]}
    return {"arch": arch, "depth": depth, "in_channels": in_channels, "num_classes": num_classes,
            "channels": channels}


def resnet_spec(depth: int, width: int, in_channels: int, num_classes: int) -> dict[str, Any]:
    """Spec of an unpruned CIFAR BasicBlock ResNet of depth 6n+2."""
    return model_spec("resnet", depth, width, in_channels, num_classes)


def _expect_in(conv: nn.Conv2d, expected: int, name: str, source: str) -> None:
    if conv.in_channels != expected:
        raise ValueError(f"{name} takes {conv.in_channels} channels but {source} gives {expected}: "
                         "the module was not pruned consistently")


def spec_of(model: ResNet) -> dict[str, Any]:
    """The spec of ``model`` as its modules are *now*: after physical (structured) pruning has removed
    channels in place, ``build_model(spec_of(m)).load_state_dict(m.state_dict())`` rebuilds it exactly."""
    bottleneck = model.arch in BOTTLENECK_ARCHS
    stem = model.conv1.out_channels
    prev, source = stem, "conv1"
    stages, mids = [], []
    for s, layer in enumerate(model.stages, start=1):
        last = layer[-1].conv3 if bottleneck else layer[-1].conv2
        out = last.out_channels
        stage_mids = []
        for b, block in enumerate(layer):
            name = f"layer{s}.{b}"
            _expect_in(block.conv1, prev, f"{name}.conv1", source)
            if isinstance(block.shortcut, nn.Sequential):
                _expect_in(block.shortcut[0], prev, f"{name}.shortcut.0", source)
            elif prev != out:
                raise ValueError(f"{name} has an identity shortcut from {prev} to {out} channels "
                                 f"({source} gives {prev}): the module was not pruned consistently")
            _expect_in(block.conv2, block.conv1.out_channels, f"{name}.conv2", f"{name}.conv1")
            if bottleneck:
                _expect_in(block.conv3, block.conv2.out_channels, f"{name}.conv3", f"{name}.conv2")
                stage_mids.append([block.conv1.out_channels, block.conv2.out_channels])
            else:
                stage_mids.append(block.conv1.out_channels)
            prev, source = out, f"layer{s}"
        stages.append(out)
        mids.append(stage_mids)
    if model.fc.in_features != prev:
        raise ValueError(f"fc takes {model.fc.in_features} features but {source} gives {prev}: "
                         "the module was not pruned consistently")
    channels = {"stem": stem, "stages": stages, "mids": mids} if bottleneck else {"stages": stages, "mids": mids}
    return {"arch": model.arch, "depth": model.depth, "in_channels": model.conv1.in_channels,
            "num_classes": model.fc.out_features, "channels": channels}


def build_model(spec: dict[str, Any]) -> ResNet:
    """The module a spec describes (ValueError naming what is wrong with an invalid spec)."""
    return ResNet(spec)


def spec_from_params(model_params, in_channels: int, num_classes: int) -> dict[str, Any]:
    """Spec of the unpruned model that ``params.yaml``'s ``model`` section describes."""
    return model_spec(model_params.arch, model_params.depth, model_params.width, in_channels, num_classes)


