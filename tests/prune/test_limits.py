"""Structured pruning never compresses less at a higher prune.ratio (issue 27): Torch-Pruning keeps
int(n x (1 - ratio)) of a group's n channels and leaves a group whole where that is 0, so l1_filter / channel
once gave 1.00x at ratio 0.99 on ResNet-8 w16, and less at 0.95 than at 0.9. Such a ratio is now refused, in
one line naming the largest valid one, before anything is pruned or written."""
import copy

import pytest
import torch
import yaml

import kdprune.prune
from kdprune import checkpoint, stage
from kdprune.experiments.frontier_search import STRUCTURED
from kdprune.measure import size_report
from kdprune.models import build_model, model_spec, resnet_spec
from kdprune.params import PruneParams
from kdprune.prune import prune
from kdprune.prune.channel import ChannelPruningError
from kdprune.prune.limits import kept, largest_ratio
from kdprune.prune.masks import PruningError
from tests.helpers import default_params, write_fake_dataset

SHAPE = (1, 28, 28)
ERRORS = {"l1_filter": PruningError, "channel": ChannelPruningError}


def teacher(width: int):
    torch.manual_seed(0)
    return build_model(model_spec("resnet", 8, width, 1, 10))


def compression(model, method: str, ratio: float) -> float:
    return size_report(prune(model, PruneParams(method=method, ratio=ratio), SHAPE).model, model, True, True)[
        "compression_ratio"]


@pytest.mark.parametrize("method", ["l1_filter", "channel"])
@pytest.mark.parametrize("ratio", [0.95, 0.97, 0.99, 0.999])
def test_a_ratio_that_would_leave_a_layer_no_channel_is_refused_naming_the_largest_valid_one(method, ratio):
    """The default model (ResNet-8 w16): 0.99 and 0.999 pruned nothing (1.00x), 0.95 and 0.97 less than 0.9."""
    model = teacher(16)
    with pytest.raises(ERRORS[method]) as e:
        prune(model, PruneParams(method=method, ratio=ratio), SHAPE)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and len(msg) < 400, msg
    assert msg.startswith(f"prune.ratio = {ratio} is invalid for prune.method {method} on this model: it would keep "
                          f"int(16 x (1 - {ratio})) = 0 of the 16 channels of ")
    assert msg.endswith("the largest ratio that keeps a channel in every layer is 0.9375")
    # the named limit is honoured, and compresses more than every lower ratio
    assert compression(model, method, 0.9375) > compression(model, method, 0.9)


@pytest.mark.parametrize("method", ["magnitude", "l1_filter", "channel"])
def test_compression_never_falls_as_the_ratio_grows(method):
    """ResNet-8 w8 (8-channel layers: the limit is 0.875): over a grid of ratios, each one either compresses at
    least as much as every lower one or is refused, and every ratio above a refused one is refused too."""
    model = teacher(8)
    grid = [0.0, 0.1, 0.3, 0.5, 0.7, 0.8, 0.85, 0.87, 0.875, 0.88, 0.9, 0.95, 0.97, 0.99, 0.999]
    got = []
    for r in grid:
        try:
            got.append((r, compression(model, method, r)))
        except (PruningError, ChannelPruningError):
            got.append((r, None))
    accepted = [c for _, c in got if c is not None]
    assert got[: len(accepted)] == [(r, c) for r, c in got if c is not None], got  # refusals only at the top
    assert all(b >= a for a, b in zip(accepted, accepted[1:])), got
    assert all(c > accepted[0] for c in accepted[1:]), got  # every ratio > 0 prunes something (0 prunes nothing)
    if method == "magnitude":
        assert len(accepted) == len(grid)
    else:
        assert [r for r, c in got if c is None][0] == 0.88 == grid[len(accepted)]  # 0.875 is the largest valid


@pytest.mark.parametrize("method", ["l1_filter", "channel"])
def test_a_ratio_that_removes_no_channel_is_refused(method):
    """1 - 1e-17 is 1.0: every layer would keep all its channels (int(n x 1.0) = n) and nothing be pruned."""
    with pytest.raises(ERRORS[method], match=r"it removes no channel .*at least 0\.0001$"):
        prune(teacher(4), PruneParams(method=method, ratio=1e-17), SHAPE)
    assert compression(teacher(4), method, 0.0001) > 1


def test_the_largest_valid_ratio_follows_torch_prunings_rounding():
    """int(10 x (1 - 0.9)) is 0 in floating point (1 - 0.9 = 0.0999...): the limit for 10 channels is 0.8999."""
    assert kept(10, 0.9) == 0 and largest_ratio(10) == 0.8999 and kept(10, 0.8999) == 1
    assert [largest_ratio(n) for n in (2, 4, 8, 16, 64)] == [0.5, 0.75, 0.875, 0.9375, 0.9843]
    for n in (2, 3, 7, 10, 16, 100, 1000):
        assert kept(n, largest_ratio(n)) >= 1 and kept(n, largest_ratio(n) + 0.0001) == 0


def test_the_frontiers_structured_methods_are_the_physical_ones():
    assert STRUCTURED == kdprune.prune.PHYSICAL


def test_the_prune_stage_refuses_the_ratio_before_writing_anything(tmp_path, monkeypatch, capsys):
    import stages.prepare
    import stages.prune

    raw = write_fake_dataset(tmp_path / "raw", n_train=40, n_test=20)
    p = copy.deepcopy(default_params())
    p["data"].update(root=str(raw), download=False)
    p["model"].update(depth=8, width=4)
    p["prune"].update(method="l1_filter", ratio=0.9)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    monkeypatch.chdir(tmp_path)
    stage.run(stages.prepare.main)
    checkpoint.save_checkpoint(tmp_path / stage.TEACHER, build_model(resnet_spec(8, 4, 1, 10)),
                               meta={"dataset": "fashion_mnist", "input_shape": [1, 28, 28]})
    with pytest.raises(SystemExit) as e:
        stage.run(stages.prune.main)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: prune.ratio = 0.9 is invalid for prune.method l1_filter") and err.endswith(" 0.75")
    assert not (tmp_path / stage.PRUNED).exists() and not (tmp_path / stage.METRICS / "prune.json").exists()
