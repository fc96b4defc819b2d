"""The model zoo's architectures and their shape rules: which archs exist, which depths each allows, how many
residual blocks each stage has, and their short human names. No torch: params validation (stages/validate.py) and the zoo
(kdprune/models/zoo.py) both read them from here."""
from __future__ import annotations

from typing import Any


ARCHS = {  # the model zoo (kdprune/models/zoo.py): arch -> (what it is, its depths); see stage_blocks
    "resnet": ("CIFAR ResNet, BasicBlock, 3 stages", "6n+2: 8, 14, 20, 32, 44, 56, 110, ..."),
    "resnet_bottleneck": ("CIFAR ResNet, Bottleneck, 3 stages", "9n+2: 11, 20, 29, 47, 56, 110, 164, ..."),
    "resnet_imagenet": ("ResNet-50/101/152 layout, Bottleneck, 4 stages, CIFAR 3x3 stem without max-pool",
                        "50, 101 or 152"),
}
MODEL_ARCHS = (*ARCHS, "torchvision", "custom")  # the zoo, any torchvision classifier, the user's own factory


# torchvision.models.list_models(module=torchvision.models) of torchvision 0.29: its classification builders,
# all of which take num_classes. Listed here so that validation needs no torch (stages/validate.py);
# tests/models/test_byo_models.py checks the list against the installed torchvision, and kdprune.models checks
# every name it builds against torchvision itself.
TORCHVISION_CLASSIFIERS = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "densenet121", "densenet161",
    "densenet169", "densenet201", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l",
    "efficientnet_v2_m", "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mnasnet0_75",
    "mnasnet1_0", "mnasnet1_3", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_16gf",
    "regnet_x_1_6gf", "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf",
    "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf", "regnet_y_400mf",
    "regnet_y_800mf", "regnet_y_8gf", "resnet101", "resnet152", "resnet18", "resnet34", "resnet50",
    "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0", "squeezenet1_1", "swin_b", "swin_s", "swin_t",
    "swin_v2_b", "swin_v2_s", "swin_v2_t", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
    "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2", "wide_resnet50_2")


# Blocks per stage of the 4-stage ImageNet ResNets (He et al. 2016, Table 1).
IMAGENET_LAYOUTS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


MAX_CHANNELS = 2048  # widest layer allowed: that of the standard ResNet-50/101/152 (and ResNet-164 at width 128)


# Deepest networks allowed: the deepest CIFAR ResNets published (He et al. 2016: ResNet-1202; He et al.
# 2016b: the pre-activation ResNet-1001, Bottleneck). Deeper ones only exhaust memory.
MAX_DEPTH = {"resnet": 1202, "resnet_bottleneck": 1001}


def stage_blocks(arch: str, depth: int) -> list[int] | None:
    """Residual blocks per stage of ``arch`` at ``depth``; None where ``arch`` has no such depth.

    Depth counts the weighted layers: stem conv + 2 (BasicBlock) or 3 (Bottleneck) per block + fc;
    projection shortcuts are not counted (He et al.)."""
    if arch in MAX_DEPTH and not 1 <= depth <= MAX_DEPTH[arch]:
        return None
    if arch == "resnet":
        return [(depth - 2) // 6] * 3 if depth >= 8 and (depth - 2) % 6 == 0 else None
    if arch == "resnet_bottleneck":
        return [(depth - 2) // 9] * 3 if depth >= 11 and (depth - 2) % 9 == 0 else None
    if arch == "resnet_imagenet":
        return list(IMAGENET_LAYOUTS[depth]) if depth in IMAGENET_LAYOUTS else None
    return None


def depth_rule(arch: str) -> str:
    what, depths = ARCHS[arch]
    top = f", at most {MAX_DEPTH[arch]}" if arch in MAX_DEPTH else ""
    return f"depth {depths}{top} ({what})"


def widest_factor(arch: str) -> int:
    """Channels of the widest layer of ``arch`` divided by its ``width`` (the stage-1 width)."""
    return {"resnet": 4, "resnet_bottleneck": 16, "resnet_imagenet": 32}[arch]


def zoo_name(arch: str, depth: int) -> str:
    """A short human name: 'ResNet-20', 'ResNet-164 (bottleneck)', 'ResNet-152 (ImageNet stages)'."""
    suffix = {"resnet": "", "resnet_bottleneck": " (bottleneck)", "resnet_imagenet": " (ImageNet stages)"}
    return f"ResNet-{depth}{suffix.get(arch, f' ({arch})')}"


def model_name(arch: str, depth: int | None = None, name: str | None = None, factory: str | None = None) -> str:
    """A short human name: 'ResNet-20', 'ResNet-164 (bottleneck)', 'torchvision resnet18', 'custom pkg.mod:fn'."""
    if arch == "torchvision":
        return f"torchvision {name}"
    if arch == "custom":
        return f"custom {factory}"
    return zoo_name(arch, depth)


def spec_name(spec: dict[str, Any]) -> str:
    return model_name(spec["arch"], spec.get("depth"), spec.get("name"), spec.get("factory"))


def params_name(model_params) -> str:
    return model_name(model_params.arch, model_params.depth, model_params.name, model_params.factory)
