import pytest
import torch
import torch.nn as nn

from kdprune.data import TensorLoader
from kdprune.models import build_model, resnet_spec
from kdprune.params import DistillParams, RuntimeParams
from kdprune.prune.agp import AGPSchedule
from kdprune.prune.counts import compression_ratio, count_params, count_prunable, prunable_modules, sparsest_layer
from kdprune.prune.masks import apply_masks, global_magnitude_masks, layer_floor
from kdprune.train.loop import fit
from kdprune.train.objective import Objective


def small_model(seed=0):
    """A ResNet-8 whose BN parameters are non-zero, like a trained teacher's (init has zero biases)."""
    torch.manual_seed(seed)
    model = build_model(resnet_spec(8, 8, 1, 10))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.1, 0.5)
    return model


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.9, 0.95, 0.987])
def test_exact_fraction_removed(ratio):
    model = small_model()
    masks = global_magnitude_masks(model, ratio)
    total, before = count_prunable(model)
    assert before == total  # masks are computed, the model is untouched
    apply_masks(model, masks)
    _, nonzero = count_prunable(model)
    assert total - nonzero == round(ratio * total)
    assert sum(int((~m).sum()) for m in masks.values()) == round(ratio * total)


def test_threshold_is_global_across_layers():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1, 19, dtype=torch.float).view(2, 1, 3, 3) / 10)  # 0.1 .. 1.8
        model[2].weight.copy_(torch.tensor([[-0.05, 5.0], [0.15, -0.25]]))
    masks = global_magnitude_masks(model, 0.25)  # 22 weights -> remove the 6 smallest |w|
    removed = sorted([float(model[0].weight.detach().flatten()[i]) for i in (~masks["0.weight"]).flatten().nonzero()]
                     + [abs(float(model[2].weight.detach().flatten()[i])) for i in (~masks["2.weight"]).flatten().nonzero()])
    assert removed == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.25, 0.3])
    # a per-layer threshold would have removed 25 % of each layer instead
    assert int((~masks["2.weight"]).sum()) == 3


def test_first_and_last_layer_exclusion():
    model = small_model()
    names = [n for n, _ in prunable_modules(model, include_first_conv=False, include_last_fc=False)]
    assert "conv1" not in names and "fc" not in names and "layer1.0.conv1" in names
    masks = global_magnitude_masks(model, 0.9, include_first_conv=False, include_last_fc=False)
    assert "conv1.weight" not in masks and "fc.weight" not in masks


def test_compression_ratio_arithmetic():
    assert compression_ratio(1000, 45) == pytest.approx(22.222, rel=1e-4)
    model = nn.Linear(10, 10)  # 100 weights + 10 bias
    with torch.no_grad():
        model.weight[:9] = 0  # 90 zeros
    assert count_params(model) == (110, 20)
    assert count_prunable(model) == (100, 10)
    assert compression_ratio(110, 20) == 5.5
    with pytest.raises(ValueError):
        compression_ratio(10, 0)


def test_masks_survive_training_with_momentum_and_weight_decay():
    model = small_model()
    masks = global_magnitude_masks(model, 0.9)
    apply_masks(model, masks)
    _, nz_before = count_params(model)
    _, nz_prunable_before = count_prunable(model)
    torch.manual_seed(1)
    x = torch.randint(0, 255, (96, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (96,))
    loader = TensorLoader(x, y, [0.5], [0.25], batch_size=32, train=True, crop_padding=2, hflip=True)
    test = TensorLoader(x, y, [0.5], [0.25], batch_size=96, train=False)
    cfg = DistillParams(epochs=2, batch_size=32, lr=0.5, momentum=0.9, weight_decay=0.05, eval_every=0)
    teacher = small_model(seed=3)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, loader, test, cfg, runtime=RuntimeParams(threads=1), masks=masks, name="t", log=lambda m: None,
        objective=Objective(teacher=teacher, alpha=0.9, temperature=4.0))
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), f"{name}: a pruned weight was revived"
    assert count_params(model)[1] == nz_before
    assert count_prunable(model)[1] == nz_prunable_before
    assert any(not torch.equal(weights_before[n], p) for n, p in model.named_parameters())  # it did train


def test_without_masks_pruned_weights_would_revive():
    """The control for the test above: the same training without masks revives pruned weights."""
    model = small_model()
    masks = global_magnitude_masks(model, 0.9)
    apply_masks(model, masks)
    _, nz_before = count_params(model)
    x = torch.randint(0, 255, (64, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (64,))
    loader = TensorLoader(x, y, [0.5], [0.25], batch_size=32, train=True)
    cfg = DistillParams(epochs=1, batch_size=32, lr=0.1, eval_every=0)
    fit(model, loader, loader, cfg, runtime=RuntimeParams(threads=1), masks=None, name="t", log=lambda m: None)
    assert count_params(model)[1] > nz_before


def test_a_layer_is_never_emptied_it_keeps_its_largest_weight():
    model = small_model()
    with torch.no_grad():
        model.fc.weight.mul_(1e-4)  # the smallest weights of the net: global ranking would remove all of them
        model.fc.weight[3, 5] = 2e-4  # the fc's largest |w|, still below every conv weight kept at 0.9
    ratio = 0.9
    masks = global_magnitude_masks(model, ratio)
    total, _ = count_prunable(model)
    fc = masks["fc.weight"]
    assert int(fc.sum()) == 1 and bool(fc[3, 5]), "the fc layer must keep exactly its largest weight"
    assert all(m.any() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(ratio * total)  # still exactly the ratio
    apply_masks(model, masks)
    assert count_prunable(model)[1] == total - round(ratio * total)


def test_impossible_ratio_leaves_one_weight_per_layer():
    model = small_model()
    masks = global_magnitude_masks(model, 0.99999)  # would remove all but ~1 weight of the whole net
    assert [int(m.sum()) for m in masks.values()] == [1] * len(masks)
    for name, p in model.named_parameters():
        if name in masks:
            assert p.detach().abs().view(-1)[masks[name].view(-1)].item() == p.detach().abs().max().item()


def floor_reference(model: nn.Module, ratio: float, d: float) -> dict[str, torch.Tensor]:
    """prune.min_layer_density one weight at a time: every layer first keeps its ceil(d * n) largest |w|; then
    the globally smallest of the rest go, one by one, until round(ratio * N) are gone or none is left."""
    weights = {f"{n}.weight": m.weight.detach().abs().reshape(-1) for n, m in prunable_modules(model)}
    keep = {n: torch.zeros_like(w, dtype=torch.bool) for n, w in weights.items()}
    for n, w in weights.items():
        for i in sorted(range(len(w)), key=lambda i: -float(w[i]))[:layer_floor(len(w), d)]:
            keep[n][i] = True
    rest = sorted((float(w[i]), n, i) for n, w in weights.items() for i in range(len(w)) if not keep[n][i])
    amount = round(ratio * sum(len(w) for w in weights.values()))
    masks = {n: torch.ones_like(k) for n, k in keep.items()}
    for _, n, i in rest[:amount]:
        masks[n][i] = False
    return masks


@pytest.mark.parametrize("seed,ratio,d", [(0, 0.9, 0.05), (1, 0.95, 0.02), (2, 0.99, 0.005), (3, 0.98, 0.01),
                                          (4, 0.5, 0.3)])
def test_min_layer_density_keeps_each_layers_floor_and_the_exact_ratio(seed, ratio, d):
    model = small_model(seed)
    masks = global_magnitude_masks(model, ratio, min_layer_density=d)
    ref = floor_reference(model, ratio, d)
    assert all(torch.equal(masks[n].reshape(-1), ref[n]) for n in masks)  # the vectorised code = the reference
    total, _ = count_prunable(model)
    assert sum(int((~m).sum()) for m in masks.values()) == round(ratio * total)  # still exactly the ratio
    for n, m in masks.items():
        assert int(m.sum()) >= layer_floor(m.numel(), d), n
    plain = global_magnitude_masks(model, ratio)
    if ratio >= 0.95:  # global ranking alone leaves some layer below the floor; the floor lifts it
        assert min(int(m.sum()) / m.numel() for m in plain.values()) < d
    apply_masks(model, masks)
    assert sparsest_layer(model) >= d


def test_min_layer_density_zero_is_the_one_weight_floor_and_floors_beyond_the_ratio_keep_only_the_floors():
    model = small_model()
    assert all(torch.equal(a, b) for a, b in zip(global_magnitude_masks(model, 0.99).values(),
                                                 global_magnitude_masks(model, 0.99, min_layer_density=0).values()))
    masks = global_magnitude_masks(model, 0.9, min_layer_density=0.2)  # the floors keep 20 %: 10 % cannot be met
    assert all(int(m.sum()) == layer_floor(m.numel(), 0.2) for m in masks.values())
    assert layer_floor(30, 0.1) == 3 and layer_floor(5, 0.5) == 3 and layer_floor(1, 0.01) == 1


def test_agp_updates_keep_the_floor():
    model = small_model()
    schedule = AGPSchedule(0.99, 2, 1.0, 10, min_layer_density=0.02)
    for step in sorted(schedule.at):
        masks = schedule.masks_at(model, step)
        assert all(int(m.sum()) >= layer_floor(m.numel(), 0.02) for m in masks.values())
