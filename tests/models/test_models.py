import typing

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprune import checkpoint, io
from kdprune.models import build_model, check_spec, model_spec, resnet_spec, spec_from_params, spec_of
from kdprune.archs import ARCHS, IMAGENET_LAYOUTS, MODEL_ARCHS
from kdprune.params import ModelParams, ParamsError


def expected_params(depth: int, width: int, in_ch: int, classes: int) -> int:
    """Closed-form parameter count of a CIFAR BasicBlock ResNet with projection shortcuts."""
    n = (depth - 2) // 6
    w = [width, 2 * width, 4 * width]
    total = in_ch * w[0] * 9 + 2 * w[0]  # stem conv + BN
    prev = w[0]
    for s, c in enumerate(w):
        for b in range(n):
            total += prev * c * 9 + 2 * c + c * c * 9 + 2 * c  # conv1+bn1, conv2+bn2
            if s > 0 and b == 0:
                total += prev * c + 2 * c  # projection shortcut + BN
            prev = c
    return total + prev * classes + classes  # fc


@pytest.mark.parametrize("depth", [8, 14, 20, 32])
@pytest.mark.parametrize("in_ch,size", [(1, 28), (3, 32)])
def test_shapes_and_param_counts(depth, in_ch, size):
    model = build_model(resnet_spec(depth, 16, in_ch, 10))
    out, feats = model(torch.randn(2, in_ch, size, size), return_features=True)
    assert out.shape == (2, 10)
    assert [f.shape[1] for f in feats] == [16, 32, 64]
    assert feats[0].shape[-1] == size and feats[2].shape[-1] == (size + 3) // 4
    assert sum(p.numel() for p in model.parameters()) == expected_params(depth, 16, in_ch, 10)


@pytest.mark.parametrize("depth", [44, 56, 110])
def test_deep_basicblock_nets_at_small_width(depth):
    model = build_model(resnet_spec(depth, 4, 3, 100))
    out, feats = model(torch.randn(1, 3, 32, 32), return_features=True)
    assert out.shape == (1, 100) and [tuple(f.shape[1:]) for f in feats] == [(4, 32, 32), (8, 16, 16), (16, 8, 8)]
    assert sum(p.numel() for p in model.parameters()) == expected_params(depth, 4, 3, 100)


def test_resnet20_is_the_usual_size():
    assert 0.26e6 < expected_params(20, 16, 3, 10) < 0.28e6  # He et al.: 0.27M


@pytest.mark.parametrize("depth", [7, 9, 10, 2])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        resnet_spec(depth, 16, 1, 10)


def test_checkpoint_roundtrip_without_original(tmp_path):
    model = build_model(resnet_spec(14, 8, 1, 10)).eval()
    x = torch.randn(3, 1, 28, 28)
    masks = {"fc.weight": torch.rand_like(model.fc.weight) > 0.5}
    checkpoint.save_checkpoint(tmp_path / "m.pt", model, masks=masks, meta={"dataset": "x"})
    loaded, loaded_masks, meta = checkpoint.load_checkpoint(tmp_path / "m.pt", expect_classes=10)
    assert torch.equal(loaded.eval()(x), model(x))
    assert torch.equal(loaded_masks["fc.weight"], masks["fc.weight"]) and meta == {"dataset": "x"}


def test_checkpoint_class_mismatch_and_unsafe_pickle(tmp_path):
    model = build_model(resnet_spec(8, 8, 1, 10))
    checkpoint.save_checkpoint(tmp_path / "m.pt", model)
    with pytest.raises(io.CheckpointError, match="10 output classes but the dataset has 100"):
        checkpoint.load_checkpoint(tmp_path / "m.pt", expect_classes=100)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(io.CheckpointError, match="weights_only"):
        checkpoint.load_checkpoint(tmp_path / "evil.pt")


def test_checkpoint_spec_mismatch_is_clear(tmp_path):
    model = build_model(resnet_spec(8, 8, 1, 10))
    ckpt = {"format": checkpoint.CHECKPOINT_FORMAT, "spec": resnet_spec(8, 16, 1, 10),
            "state_dict": model.state_dict(), "masks": None, "meta": {}}
    torch.save(ckpt, tmp_path / "m.pt")
    with pytest.raises(io.CheckpointError, match="do not match the stored architecture spec"):
        checkpoint.load_checkpoint(tmp_path / "m.pt")


def test_torch_save_is_byte_identical_whatever_the_temp_name(tmp_path):
    """io.torch_save goes through a random temp file; the bytes must not depend on its name (DVC hashes)."""
    model = build_model(resnet_spec(8, 4, 1, 10))
    checkpoint.save_checkpoint(tmp_path / "a.pt", model)
    checkpoint.save_checkpoint(tmp_path / "b.pt", model)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_spec_of_reads_the_module_as_it_is():
    spec = resnet_spec(14, 8, 1, 10)
    model = build_model(spec)
    assert spec_of(model) == spec
    # shrink one block's mid channels by hand, as structured pruning would
    block = model.layer2[1]
    block.conv1 = torch.nn.Conv2d(16, 5, 3, 1, 1, bias=False)
    block.bn1 = torch.nn.BatchNorm2d(5)
    block.conv2 = torch.nn.Conv2d(5, 16, 3, 1, 1, bias=False)
    spec2 = spec_of(model)
    assert spec2["channels"]["mids"] == [[8, 8], [16, 5], [32, 32]]
    rebuilt = build_model(spec2)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 28, 28)
    model.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), model(x))


# ---------------------------------------------------------------------------------------------------
# The zoo: Bottleneck CIFAR ResNets (9n+2) and the ResNet-50/101/152 layout with a CIFAR stem.

def expected_bottleneck_params(blocks: list[int], width: int, in_ch: int, classes: int) -> int:
    """Closed-form parameter count: stem 3x3 conv + BN; per block 1x1, 3x3, 1x1 (x4) convs with BNs;
    a 1x1 projection + BN in the first block of every stage; fc."""
    total = in_ch * width * 9 + 2 * width
    prev = width
    for s, n in enumerate(blocks):
        m = width * 2 ** s
        out = 4 * m
        for b in range(n):
            total += prev * m + 2 * m + m * m * 9 + 2 * m + m * out + 2 * out
            if b == 0:
                total += prev * out + 2 * out
            prev = out
    return total + prev * classes + classes


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth,width", [(11, 8), (29, 8), (47, 4), (164, 4)])
def test_bottleneck_shapes_and_param_counts(depth, width):
    model = build_model(model_spec("resnet_bottleneck", depth, width, 3, 10))
    out, feats = model(torch.randn(2, 3, 32, 32), return_features=True)
    assert out.shape == (2, 10)
    assert [tuple(f.shape[1:]) for f in feats] == [(4 * width, 32, 32), (8 * width, 16, 16), (16 * width, 8, 8)]
    n = (depth - 2) // 9
    assert n_params(model) == expected_bottleneck_params([n] * 3, width, 3, 10)


def test_resnet164_is_the_usual_size():
    counts = [n_params(build_model(model_spec("resnet_bottleneck", 164, 16, 3, c))) for c in (10, 100)]
    basic = [n_params(build_model(model_spec("resnet", d, 16, 3, 10))) for d in (20, 56, 110)]
    assert counts == [expected_bottleneck_params([18] * 3, 16, 3, c) for c in (10, 100)]
    assert counts == [1_704_154, 1_727_284]  # He et al. 2016b: 1.7M
    # the BasicBlock counts quoted in kdprune/models.py
    assert basic == [expected_params(d, 16, 3, 10) for d in (20, 56, 110)] == [272_474, 855_770, 1_730_714]


@pytest.mark.parametrize("depth", [50, 101, 152])
def test_imagenet_layout_matches_torchvision_but_for_stem_and_fc(depth):
    """Same tensors as torchvision's resnet{depth} (its ``downsample`` is our ``shortcut``), except the
    3x3 stem conv and the fc; built on the meta device, so this costs no memory."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        ours = build_model(model_spec("resnet_imagenet", depth, 64, 3, 100))
        tv = getattr(torchvision.models, f"resnet{depth}")()
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    tv_shapes = {k.replace("downsample", "shortcut"): tuple(v.shape) for k, v in tv.state_dict().items()}
    assert ours_shapes.pop("conv1.weight") == (64, 3, 3, 3) and tv_shapes.pop("conv1.weight") == (64, 3, 7, 7)
    assert ours_shapes.pop("fc.weight") == (100, 2048) and tv_shapes.pop("fc.weight") == (1000, 2048)
    assert ours_shapes.pop("fc.bias") == (100,) and tv_shapes.pop("fc.bias") == (1000,)
    assert ours_shapes == tv_shapes
    stem_and_fc = 64 * 3 * (49 - 9) + 2048 * 900 + 900
    assert n_params(ours) == n_params(tv) - stem_and_fc
    assert n_params(ours) == expected_bottleneck_params(list(IMAGENET_LAYOUTS[depth]), 64, 3, 100)


def test_resnet152_builds_and_runs():
    """The paper's teacher, built for real once: ~58M parameters, a forward on one 32x32 image."""
    torch.manual_seed(0)
    model = build_model(model_spec("resnet_imagenet", 152, 64, 3, 100)).eval()
    assert n_params(model) == 58_341_028 == 60_192_808 - 7_680 - 1_844_100  # torchvision's resnet152, adjusted
    with torch.device("meta"):
        assert n_params(build_model(model_spec("resnet_imagenet", 152, 64, 3, 10))) == 58_156_618
    with torch.no_grad():
        out, feats = model(torch.randn(1, 3, 32, 32), return_features=True)
    assert out.shape == (1, 100) and torch.isfinite(out).all()
    assert [tuple(f.shape[1:]) for f in feats] == [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)]
    assert [len(layer) for layer in model.stages] == [3, 8, 36, 3]


def test_width_scales_every_layer_of_the_imagenet_layout():
    spec = model_spec("resnet_imagenet", 50, 16, 3, 10)
    ch = spec["channels"]
    assert ch["stem"] == 16 and ch["stages"] == [64, 128, 256, 512]
    assert ch["mids"] == [[[16, 16]] * 3, [[32, 32]] * 4, [[64, 64]] * 6, [[128, 128]] * 3]
    assert n_params(build_model(spec)) == expected_bottleneck_params([3, 4, 6, 3], 16, 3, 10)


SMALL = [  # one small member of each arch, for the round trips
    model_spec("resnet", 14, 8, 1, 10),
    model_spec("resnet_bottleneck", 20, 4, 3, 10),
    model_spec("resnet_imagenet", 50, 4, 3, 100),
]
SMALL_IDS = [s["arch"] for s in SMALL]


def test_the_round_trips_cover_every_arch():
    assert sorted(SMALL_IDS) == sorted(ARCHS)


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN affine and running stats, so a mis-mapped channel shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
                m.running_mean.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


@pytest.mark.parametrize("spec", SMALL, ids=SMALL_IDS)
def test_every_arch_round_trips_through_a_checkpoint_and_spec_of(spec, tmp_path):
    model = build_model(spec)
    _randomise_bn(model)
    model.eval()
    assert spec_of(model) == spec and model.spec == spec
    x = torch.randn(2, spec["in_channels"], 32, 32)
    checkpoint.save_checkpoint(tmp_path / "m.pt", model, meta={"dataset": "x"})
    loaded, masks, meta = checkpoint.load_checkpoint(tmp_path / "m.pt", expect_classes=spec["num_classes"])
    assert loaded.spec == spec and masks is None and meta == {"dataset": "x"}
    out, feats = model(x, return_features=True)
    out2, feats2 = loaded.eval()(x, return_features=True)
    assert torch.equal(out2, out) and len(feats) == len(feats2) == len(spec["channels"]["stages"])
    assert all(torch.equal(a, b) for a, b in zip(feats, feats2))


@pytest.mark.parametrize("spec", SMALL, ids=SMALL_IDS)
def test_torch_pruning_round_trip(spec, tmp_path):
    """Torch-Pruning removes channels in place (residuals coupled); the spec read back rebuilds it exactly."""
    tp = pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = build_model(spec)
    _randomise_bn(model)
    x = torch.randn(1, spec["in_channels"], 32, 32)
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    pruned_spec = spec_of(model)
    check_spec(pruned_spec)
    ch, ch0 = pruned_spec["channels"], spec["channels"]
    assert ch["stages"] == [c // 2 for c in ch0["stages"]]  # the stage outputs shrank too
    if "stem" in ch0:
        assert ch["stem"] == ch0["stem"] // 2  # its own group in the Bottleneck archs
    rebuilt = build_model(pruned_spec)
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    assert torch.equal(rebuilt(x), model(x))
    checkpoint.save_checkpoint(tmp_path / "p.pt", model)  # model.spec is read from the pruned modules
    loaded, _, _ = checkpoint.load_checkpoint(tmp_path / "p.pt")
    assert loaded.spec == pruned_spec and torch.equal(loaded.eval()(x), model(x))


def test_bottleneck_inner_widths_and_stem_are_independent():
    """Each Bottleneck's two mid widths and the stem shrink on their own, as filter pruning does them."""
    spec = model_spec("resnet_bottleneck", 11, 4, 3, 10)
    spec["channels"]["stem"] = 3
    spec["channels"]["mids"][1][0] = [5, 2]
    spec["channels"]["stages"][2] = 7
    model = build_model(spec)
    assert spec_of(model) == spec
    block = model.layer2[0]
    assert (block.conv1.out_channels, block.conv2.out_channels, block.conv3.out_channels) == (5, 2, 32)
    assert model.conv1.out_channels == 3 and model.layer1[0].conv1.in_channels == 3
    assert model.fc.in_features == 7
    # stem == stage-1 output by coincidence: the projection stays (it is structural, not inferred)
    spec["channels"]["stem"] = spec["channels"]["stages"][0]
    assert isinstance(build_model(spec).layer1[0].shortcut, nn.Sequential)


def test_spec_of_names_an_inconsistent_module():
    model = build_model(resnet_spec(8, 8, 1, 10))
    model.layer2[0].conv2 = nn.Conv2d(5, 16, 3, 1, 1, bias=False)  # conv1 still gives 16
    with pytest.raises(ValueError, match=r"layer2.0.conv2 takes 5 channels but layer2.0.conv1 gives 16"):
        spec_of(model)
    model = build_model(resnet_spec(8, 8, 1, 10))
    model.conv1 = nn.Conv2d(1, 4, 3, 1, 1, bias=False)  # the stem of a BasicBlock net is coupled to stage 1
    with pytest.raises(ValueError, match="layer1.0.conv1 takes 8 channels but conv1 gives 4"):
        spec_of(model)


def test_old_checkpoint_spec_still_loads(tmp_path):
    """The spec format of the first checkpoints (arch resnet, no stem) is still the resnet format."""
    old_spec = {"arch": "resnet", "depth": 8, "in_channels": 1, "num_classes": 10,
                "channels": {"stages": [16, 32, 64], "mids": [[16], [32], [64]]}}
    torch.manual_seed(0)
    old = _OldResNet(old_spec)
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "spec": old_spec, "state_dict": old.state_dict(),
                "masks": None, "meta": {}}, tmp_path / "old.pt")
    loaded, _, _ = checkpoint.load_checkpoint(tmp_path / "old.pt")
    x = torch.randn(2, 1, 28, 28)
    assert loaded.spec == old_spec and torch.equal(loaded.eval()(x), old.eval()(x))


class _OldBlock(nn.Module):  # kdprune/models.py before the zoo (e662031), frozen as the reference
    def __init__(self, in_ch, mid_ch, out_ch, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class _OldResNet(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        stage_ch, mids = spec["channels"]["stages"], spec["channels"]["mids"]
        self.conv1 = nn.Conv2d(spec["in_channels"], stage_ch[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stage_ch[0])
        in_ch, stages = stage_ch[0], []
        for s, (out_ch, stage_mids) in enumerate(zip(stage_ch, mids)):
            blocks = []
            for b, mid in enumerate(stage_mids):
                blocks.append(_OldBlock(in_ch, mid, out_ch, stride=2 if (s > 0 and b == 0) else 1))
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

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layer3(self.layer2(self.layer1(x))), 1), 1))


@pytest.mark.parametrize("args", [(8, 16, 1, 10), (20, 16, 3, 100)])
def test_default_resnet_is_unchanged_by_the_zoo(args, tmp_path):
    """Same seed, same parameter names, same init order, same values, same checkpoint bytes (DVC hashes)."""
    torch.manual_seed(0)
    old = _OldResNet(resnet_spec(*args))
    torch.manual_seed(0)
    new = build_model(resnet_spec(*args))
    old_sd, new_sd = old.state_dict(), new.state_dict()
    assert list(new_sd) == list(old_sd)
    assert all(torch.equal(new_sd[k], old_sd[k]) for k in old_sd)
    checkpoint.save_checkpoint(tmp_path / "old.pt", old)
    checkpoint.save_checkpoint(tmp_path / "new.pt", new)
    assert (tmp_path / "new.pt").read_bytes() == (tmp_path / "old.pt").read_bytes()


@pytest.mark.parametrize("arch,depth,needle", [
    ("resnet", 11, "6n\\+2"),
    ("resnet_bottleneck", 8, "9n\\+2"),
    ("resnet_bottleneck", 2, "9n\\+2"),
    ("resnet_imagenet", 18, "50, 101 or 152"),
    ("vgg", 16, "unknown model arch 'vgg'; available: 'resnet': depth 6n\\+2"),
])
def test_bad_arch_or_depth_names_what_exists(arch, depth, needle):
    with pytest.raises(ValueError, match=needle):
        model_spec(arch, depth, 16, 3, 10)


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.update(arch="resnet50"), "unknown model arch 'resnet50'"),
    (lambda s: s.update(depth=29), "depth 29 of arch 'resnet_bottleneck' has \\[3, 3, 3\\] blocks per stage"),
    (lambda s: s.update(extra=1), "has keys"),
    (lambda s: s["channels"].pop("stem"), "expected \\['stem', 'stages', 'mids'\\]"),
    (lambda s: s["channels"]["stages"].append(512), "has 3 stages"),
    (lambda s: s["channels"]["mids"][0].__setitem__(0, 16), "needs \\[conv1 out, conv2 out\\]"),
    (lambda s: s["channels"]["mids"][0].__setitem__(0, [16, 0]), r"mids\[0\]\[0\]\[1\] = 0: must be an integer >= 1"),
    (lambda s: s.update(num_classes=True), "num_classes = True"),
])
def test_bad_spec_is_named(edit, needle):
    spec = model_spec("resnet_bottleneck", 20, 4, 3, 10)
    edit(spec)
    with pytest.raises(ValueError, match=needle):
        build_model(spec)


def test_a_resnet_spec_has_no_stem_entry():
    spec = resnet_spec(8, 8, 1, 10)
    spec["channels"]["stem"] = 8
    with pytest.raises(ValueError, match="expected \\['stages', 'mids'\\]"):
        build_model(spec)


def test_params_and_models_agree_on_the_zoo():
    assert typing.get_args(typing.get_type_hints(ModelParams)["arch"]) == MODEL_ARCHS == (*ARCHS, "torchvision", "custom")
    for arch in ARCHS:
        width = 64 if arch == "resnet_imagenet" else 16
        for depth in range(1, 200):
            try:
                ModelParams(arch, depth, width).validate("model")
            except ParamsError:
                with pytest.raises(ValueError):
                    model_spec(arch, depth, width, 3, 10)
                continue
            spec = spec_from_params(ModelParams(arch, depth, width), 3, 10)
            check_spec(spec)
            assert spec["arch"] == arch and spec["depth"] == depth
