"""CIFAR-style ResNets (He et al. 2016, section 4.2): a 3x3 stem, three stages, global pooling.

A model is fully described by its *spec*, a plain dict that a checkpoint stores next to the
state_dict. The spec holds the per-layer channel counts, so a physically pruned model (fewer
channels) is rebuilt from its checkpoint without the original module ever being pickled.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:  # projection shortcut ("option B")
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = spec
        ch = spec["channels"]
        stage_ch: list[int] = ch["stages"]
        mids: list[list[int]] = ch["mids"]
        self.conv1 = nn.Conv2d(spec["in_channels"], stage_ch[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stage_ch[0])
        in_ch = stage_ch[0]
        stages = []
        for s, (out_ch, stage_mids) in enumerate(zip(stage_ch, mids)):
            blocks = []
            for b, mid in enumerate(stage_mids):
                blocks.append(BasicBlock(in_ch, mid, out_ch, stride=2 if (s > 0 and b == 0) else 1))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(in_ch, spec["num_classes"])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        x = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(f3, 1), 1))
        if return_features:
            return logits, [f1, f2, f3]
        return logits


def resnet_spec(depth: int, width: int, in_channels: int, num_classes: int) -> dict[str, Any]:
    """Spec of an unpruned CIFAR BasicBlock ResNet of depth 6n+2."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"model.depth = {depth}: a CIFAR BasicBlock ResNet needs depth = 6n+2 with n >= 1")
    n = (depth - 2) // 6
    stages = [width, 2 * width, 4 * width]
    return {
        "arch": "resnet",
        "depth": depth,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "channels": {"stages": stages, "mids": [[c] * n for c in stages]},
    }


def spec_of(model: ResNet) -> dict[str, Any]:
    """The spec of ``model`` as its modules are *now*: after physical (structured) pruning has removed
    channels in place, ``build_model(spec_of(m)).load_state_dict(m.state_dict())`` rebuilds it exactly."""
    stages = [layer[-1].conv2.out_channels for layer in (model.layer1, model.layer2, model.layer3)]
    mids = [[block.conv1.out_channels for block in layer] for layer in (model.layer1, model.layer2, model.layer3)]
    if model.conv1.out_channels != stages[0]:
        raise ValueError(f"stem has {model.conv1.out_channels} channels but stage 1 has {stages[0]}; "
                         "a BasicBlock CIFAR ResNet couples them through the identity shortcut")
    return {**model.spec, "channels": {"stages": stages, "mids": mids}}


def build_model(spec: dict[str, Any]) -> ResNet:
    if spec.get("arch") != "resnet":
        raise ValueError(f"unknown model arch {spec.get('arch')!r}; available: ['resnet']")
    return ResNet(spec)


def spec_from_params(model_params, in_channels: int, num_classes: int) -> dict[str, Any]:
    return resnet_spec(model_params.depth, model_params.width, in_channels, num_classes)
