"""Issue #4's methods, unit by unit: structured filter pruning, scratch re-init, attention transfer,
the AGP schedule, the compact export and ONNX parity."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from kdprune import checkpoint
from kdprune.data import TensorLoader
from kdprune.export import (ExportError, compact_bound_bytes, export_compact, export_onnx, load_compact,
                            onnx_max_abs_diff)
from kdprune.train.losses import at_loss, attention_map
from kdprune.models import build_model, model_spec, resnet_spec, spec_of
from kdprune.params import DistillParams, RuntimeParams
from kdprune.prune.agp import agp_sparsity, AGPSchedule
from kdprune.prune.counts import count_params, count_prunable
from kdprune.prune.filters import inner_convs, l1_filter_prune
from kdprune.prune.masks import apply_masks, global_magnitude_masks
from kdprune.train.recovery import reinitialise
from kdprune.train.loop import fit
from kdprune.train.objective import Objective


def l1_pruned(spec, ratio, size):
    torch.manual_seed(0)
    model = build_model(spec)
    l1_filter_prune(model, ratio, torch.zeros(1, spec["in_channels"], size, size))
    rebuilt = build_model(spec_of(model))
    rebuilt.load_state_dict(model.state_dict())
    return model, rebuilt


@pytest.mark.parametrize("depth", [8, 14, 20, 32, 56])
def test_l1_filter_gives_a_smaller_working_model(depth, tmp_path):
    spec = resnet_spec(depth, 8, 3, 10)
    dense_params = count_params(build_model(spec))[0]
    model, rebuilt = l1_pruned(spec, 0.5, 32)
    new_spec = spec_of(model)
    assert new_spec["channels"]["stages"] == spec["channels"]["stages"]  # residual path untouched
    assert new_spec["channels"]["mids"] == [[c // 2] * len(m) for c, m in zip(spec["channels"]["stages"],
                                                                            spec["channels"]["mids"])]
    total = count_params(model)[0]
    assert total == count_params(build_model(new_spec))[0] < dense_params  # the spec describes the real model
    x = torch.randn(2, 3, 32, 32)
    model.eval(), rebuilt.eval()
    assert model(x).shape == (2, 10)
    torch.testing.assert_close(rebuilt(x), model(x))
    checkpoint.save_checkpoint(tmp_path / "p.pt", rebuilt)  # save -> load without the original
    loaded, _, _ = checkpoint.load_checkpoint(tmp_path / "p.pt")
    loaded.eval()
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("arch,depth,width", [("resnet_bottleneck", 11, 4), ("resnet_bottleneck", 29, 4),
                                              ("resnet_imagenet", 50, 4), ("resnet_imagenet", 152, 2)])
def test_l1_filter_on_bottleneck_archs(arch, depth, width, tmp_path):
    spec = model_spec(arch, depth, width, 3, 10)
    dense_params = count_params(build_model(spec))[0]
    model, rebuilt = l1_pruned(spec, 0.5, 32)
    new = spec_of(model)
    assert new["channels"]["stages"] == spec["channels"]["stages"] and new["channels"]["stem"] == spec["channels"]["stem"]
    for stage_old, stage_new in zip(spec["channels"]["mids"], new["channels"]["mids"]):
        for (a, b), (a2, b2) in zip(stage_old, stage_new):  # both inner convs of every bottleneck halve
            assert (a2, b2) == (a // 2, b // 2)
    assert count_params(model)[0] == count_params(build_model(new))[0] < dense_params
    x = torch.randn(2, 3, 32, 32)
    model.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), model(x))
    checkpoint.save_checkpoint(tmp_path / "p.pt", rebuilt)
    loaded = checkpoint.load_checkpoint(tmp_path / "p.pt")[0].eval()
    torch.testing.assert_close(loaded(x), model(x))


def test_l1_filter_keeps_the_filters_with_the_largest_l1_norm():
    spec = resnet_spec(8, 8, 1, 10)
    torch.manual_seed(0)
    model = build_model(spec)
    conv = model.layer1[0].conv1
    with torch.no_grad():
        for i in range(8):
            conv.weight[i].fill_(0.01 * (i + 1) * (-1) ** i)  # L1 norm grows with i; signs alternate
        kept = conv.weight[4:].clone()
    l1_filter_prune(model, 0.5, torch.zeros(1, 1, 28, 28))
    assert model.layer1[0].conv1.out_channels == 4
    torch.testing.assert_close(model.layer1[0].conv1.weight, kept)
    assert model.layer1[0].bn1.num_features == 4 and model.layer1[0].conv2.in_channels == 4


def test_inner_convs_are_the_non_residual_ones():
    model = build_model(resnet_spec(14, 4, 1, 10))
    assert inner_convs(model) == [b.conv1 for layer in (model.layer1, model.layer2, model.layer3) for b in layer]


def test_scratch_reinitialises_and_keeps_the_mask():
    torch.manual_seed(0)
    pruned = build_model(resnet_spec(8, 8, 1, 10))
    masks = global_magnitude_masks(pruned, 0.8)
    apply_masks(pruned, masks)
    fresh = reinitialise(pruned, masks, seed=1)
    params = dict(fresh.named_parameters())
    for name, mask in masks.items():
        w, old = params[name], dict(pruned.named_parameters())[name]
        assert torch.all(w[~mask] == 0) and torch.all(w[mask] != 0)  # the same zeros ...
        assert not torch.allclose(w[mask], old[mask])  # ... but new weights
    assert count_prunable(fresh) == count_prunable(pruned)
    assert torch.equal(reinitialise(pruned, masks, 1).conv1.weight, fresh.conv1.weight)  # seeded


def test_scratch_of_a_structured_model_keeps_its_architecture():
    _, shrunk = l1_pruned(resnet_spec(8, 8, 1, 10), 0.5, 28)
    fresh = reinitialise(shrunk, None, seed=0)
    assert fresh.spec == shrunk.spec and count_params(fresh) [0] == count_params(shrunk)[0]
    assert not torch.allclose(fresh.layer2[0].conv1.weight, shrunk.layer2[0].conv1.weight)


def test_at_loss_zero_for_identical_maps_positive_otherwise():
    torch.manual_seed(0)
    feats = [torch.randn(4, 16, 8, 8), torch.randn(4, 32, 4, 4)]
    assert at_loss(feats, [f.clone() for f in feats]) == 0
    assert at_loss(feats, [f * 3.0 for f in feats]).item() == pytest.approx(0.0, abs=1e-7)  # scale-free
    assert at_loss(feats, [torch.randn_like(f) for f in feats]) > 0
    # fewer student channels: maps are spatial, so they still compare
    student = [torch.randn(4, 5, 8, 8), torch.randn(4, 9, 4, 4)]
    assert at_loss(student, feats) > 0
    assert attention_map(student[0]).shape == (4, 64)
    with pytest.raises(ValueError, match="spatial sizes"):
        at_loss([torch.randn(4, 5, 4, 4)], [torch.randn(4, 5, 8, 8)])
    with pytest.raises(ValueError, match="residual stages"):
        at_loss(student[:1], feats)


def test_at_loss_between_a_pruned_student_and_its_teacher_has_gradients():
    torch.manual_seed(0)
    teacher = build_model(resnet_spec(8, 8, 1, 10)).eval()
    _, student = l1_pruned(resnet_spec(8, 8, 1, 10), 0.5, 28)
    x = torch.randn(2, 1, 28, 28)
    _, sf = student(x, return_features=True)
    with torch.no_grad():
        _, tf = teacher(x, return_features=True)
    loss = at_loss(sf, tf)
    loss.backward()
    assert student.layer1[0].conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_agp_sparsity_reaches_exact_target_at_last_step(steps):
    values = [agp_sparsity(k, steps, 0.9) for k in range(1, steps + 1)]
    assert values[-1] == 0.9
    assert all(a < b for a, b in zip(values, values[1:]))
    if steps == 8:  # cubic: most of the pruning happens early
        assert values[0] == pytest.approx(0.9 * (1 - (7 / 8) ** 3))
    with pytest.raises(ValueError):
        agp_sparsity(0, steps, 0.9)


def test_agp_schedule_masks_hit_the_target_exactly():
    torch.manual_seed(0)
    model = build_model(resnet_spec(8, 8, 1, 10))
    sched = AGPSchedule(0.9, steps=4, end=0.5, total_steps=20)
    assert sorted(sched.at) == [2, 5, 8, 10]
    total = count_prunable(model)[0]
    removed = []
    for step in range(1, 21):
        masks = sched.masks_at(model, step)
        if masks:
            apply_masks(model, masks)
            removed.append(total - count_prunable(model)[1])
    assert len(removed) == 4 and removed == sorted(removed)
    assert removed[-1] == round(0.9 * total)


def tiny_loader(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 255, (n, 1, 12, 12), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def test_fit_with_agp_updates_the_callers_masks_in_place_and_ends_at_the_target():
    torch.manual_seed(0)
    teacher = build_model(resnet_spec(8, 4, 1, 10))
    student = copy.deepcopy(teacher)
    x, y = tiny_loader()
    train = TensorLoader(x, y, [0.5], [0.25], 16, train=True, seed=0)
    test = TensorLoader(x, y, [0.5], [0.25], 32, train=False)
    cfg = DistillParams(epochs=2, batch_size=16, eval_every=0, checkpoint_every=0)
    masks = {}
    sched = AGPSchedule(0.75, steps=3, end=0.5, total_steps=cfg.epochs * len(train))
    history = fit(student, train, test, cfg, runtime=RuntimeParams(), masks=masks, log=lambda m: None,
                  objective=Objective(teacher=teacher, alpha=0.9, temperature=4.0, at_beta=10.0), prune_schedule=sched)
    total, nonzero = count_prunable(student)
    assert total - nonzero == round(0.75 * total) == sum(int((~m).sum()) for m in masks.values())
    assert history[0]["prunable_sparsity"] == history[1]["prunable_sparsity"] == pytest.approx(0.75, abs=1e-3)


def test_compact_export_round_trips_to_identical_weights(tmp_path):
    torch.manual_seed(0)
    model = build_model(resnet_spec(8, 8, 1, 10))
    masks = global_magnitude_masks(model, 0.9)
    apply_masks(model, masks)
    with torch.no_grad():  # fp16-representable weights: the round trip is then exact
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
        model.bn1.running_mean.add_(0.5)
    size = export_compact(model, tmp_path / "m.kdc", meta={"variant": "kd"})
    assert size == (tmp_path / "m.kdc").stat().st_size
    loaded, meta = load_compact(tmp_path / "m.kdc")
    assert meta == {"variant": "kd"} and loaded.spec == model.spec
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    # at 90 % sparsity the file is within 1.25x of 2 bytes per non-zero + 1 bit per weight
    assert size <= 1.25 * compact_bound_bytes(model)
    dense = tmp_path / "m.pt"
    checkpoint.save_checkpoint(dense, model, masks)
    assert size < dense.stat().st_size / 3


def test_compact_export_of_a_structured_model_and_corruption(tmp_path):
    _, shrunk = l1_pruned(resnet_spec(8, 8, 1, 10), 0.5, 28)
    export_compact(shrunk, tmp_path / "s.kdc")
    loaded, _ = load_compact(tmp_path / "s.kdc")
    assert loaded.spec == shrunk.spec
    torch.testing.assert_close(loaded.layer2[0].conv1.weight, shrunk.layer2[0].conv1.weight.half().float())
    blob = (tmp_path / "s.kdc").read_bytes()
    (tmp_path / "t.kdc").write_bytes(blob[:-10])
    with pytest.raises(ExportError, match="truncated"):
        load_compact(tmp_path / "t.kdc")
    (tmp_path / "u.kdc").write_bytes(b"PK" + blob[2:])
    with pytest.raises(ExportError, match="bad magic"):
        load_compact(tmp_path / "u.kdc")


@pytest.mark.parametrize("structured", [False, True])
def test_onnx_matches_torch(tmp_path, structured):
    torch.manual_seed(0)
    if structured:
        _, model = l1_pruned(resnet_spec(8, 8, 1, 10), 0.5, 28)
    else:
        model = build_model(resnet_spec(8, 8, 1, 10))
        apply_masks(model, global_magnitude_masks(model, 0.9))
    model.eval()
    for m in model.modules():  # non-trivial BN statistics, so parity covers them
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    export_onnx(model, tmp_path / "m.onnx", (1, 28, 28))
    x = torch.randn(16, 1, 28, 28)  # another batch size than the export's: the batch axis is dynamic
    diff = onnx_max_abs_diff(model, tmp_path / "m.onnx", x)
    assert diff < 1e-4
    # and the check can fail: a perturbed model no longer matches the file
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    assert onnx_max_abs_diff(model, tmp_path / "m.onnx", x) == pytest.approx(1.0, abs=1e-3)


def test_export_is_deterministic(tmp_path):
    torch.manual_seed(0)
    model = build_model(resnet_spec(8, 4, 1, 10))
    export_compact(model, tmp_path / "a.kdc")
    export_compact(model, tmp_path / "b.kdc")
    export_onnx(model, tmp_path / "a.onnx", (1, 28, 28))
    export_onnx(model, tmp_path / "b.onnx", (1, 28, 28))
    assert (tmp_path / "a.kdc").read_bytes() == (tmp_path / "b.kdc").read_bytes()
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert np.isfinite(compact_bound_bytes(model))


def test_fold_batchnorm_gives_the_same_function_without_batchnorm():
    from kdprune.measure import fold_batchnorm

    _, model = l1_pruned(model_spec("resnet_bottleneck", 11, 4, 3, 10), 0.5, 32)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_the_prune_log_shows_the_channel_ratio_a_mac_target_reached(tmp_path, monkeypatch, capsys):
    """Old: with prune.target_macs_reduction the log said 'channel ratio 0.8' (prune.ratio, not used)."""
    import json

    import yaml

    import stages.prepare
    import stages.prune
    from kdprune import stage
    from tests.helpers import default_params, write_fake_dataset

    raw = write_fake_dataset(tmp_path / "raw", n_train=40, n_test=20)
    p = default_params()
    p["data"].update(root=str(raw), download=False)
    p["model"].update(depth=8, width=4)
    p["runtime"]["threads"] = 1
    p["prune"].update(method="channel", ratio=0.8, target_macs_reduction=2.0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    monkeypatch.chdir(tmp_path)
    stage.run(stages.prepare.main)
    torch.manual_seed(0)
    checkpoint.save_checkpoint(tmp_path / stage.TEACHER, build_model(resnet_spec(8, 4, 1, 10)),
                               meta={"dataset": "fashion_mnist", "input_shape": [1, 28, 28]})
    capsys.readouterr()
    stage.run(stages.prune.main)
    got = json.loads((tmp_path / "metrics" / "prune.json").read_text())
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "prune: channel" in ln)
    assert got["channel_ratio"] != 0.8 and got["reached_macs_reduction"] >= 2.0
    assert (f"prune: channel ratio {got['channel_ratio']:.4g} (reached for target_macs_reduction 2): acc " in line
            and f"MACs / {got['mac_reduction']:.2f}" in line and "0.8" not in line.split(": acc")[0]), line
