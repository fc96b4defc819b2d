"""Resume: ``fit`` checkpoints every N epochs and a rerun continues from the last checkpoint, ending
with exactly the weights of an uninterrupted run; stale or broken checkpoints are ignored."""
import dataclasses

import pytest
import torch

from kdprune import io
from kdprune.data import TensorLoader
from kdprune.models import build_model, resnet_spec
from kdprune.params import DistillParams, RuntimeParams, TrainParams
from kdprune.prune.masks import global_magnitude_masks
from kdprune.train.loop import fit
from kdprune.train.objective import Objective
from kdprune.train.resume import RESUME_FORMAT
from tests.helpers import make_fake_images

RUNTIME = RuntimeParams(threads=1, bf16=True, channels_last=True)  # the default params' runtime settings


class Killed(Exception):
    pass


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loaders(seed=0):
    x, y = make_fake_images(256, seed=0)
    tx, ty = make_fake_images(64, seed=1)
    x, y = torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long()
    tx, ty = torch.from_numpy(tx).unsqueeze(1), torch.from_numpy(ty).long()
    train = TensorLoader(x, y, [0.2], [0.3], 64, train=True, crop_padding=1, hflip=True, seed=seed,
                         channels_last=True)
    test = TensorLoader(tx, ty, [0.2], [0.3], 64, train=False, channels_last=True)
    return train, test


def setup(kind):
    """A fresh model (+ teacher, masks, alpha for the kd case) from fixed seeds, like a new process."""
    torch.manual_seed(0)
    model = build_model(resnet_spec(8, 4, 1, 10))
    if kind == "teacher":
        return model, dict(masks=None), TrainParams(epochs=3, batch_size=64, eval_every=2)
    torch.manual_seed(1)
    teacher = build_model(resnet_spec(8, 4, 1, 10))
    masks = global_magnitude_masks(model, 0.7)
    return model, dict(objective=Objective(teacher=teacher, alpha=0.9, temperature=4.0), masks=masks), \
        DistillParams(epochs=3, batch_size=64, eval_every=2)


def run(kind, cfg=None, checkpoint=None, kill_after=None, log=None):
    model, kw, default_cfg = setup(kind)
    cfg = cfg or default_cfg
    lines = [] if log is None else log

    def logger(msg):
        lines.append(msg)
        if kill_after and f"epoch {kill_after}/" in msg:
            raise Killed(msg)

    train, test = loaders()
    history = fit(model, train, test, cfg, runtime=RUNTIME, name=kind, log=logger, checkpoint=checkpoint, **kw)
    return model, history, lines


def strip_timing(history):
    return [{k: (None if v != v else v) for k, v in r.items() if k not in ("epoch_seconds", "images_per_second")}
            for r in history]  # NaN (epochs without a test point) -> None, so rows compare equal


@pytest.mark.parametrize("kind", ["teacher", "kd"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, kind):
    ref, ref_hist, _ = run(kind)  # no checkpoint at all
    ckpt = tmp_path / "checkpoints" / f"{kind}.pt"
    with pytest.raises(Killed):
        run(kind, checkpoint=ckpt, kill_after=2)  # "killed" right after epoch 2's checkpoint
    state = io.torch_load(ckpt)
    assert state["format"] == RESUME_FORMAT and state["epoch"] == 2
    assert {"model", "optimizer", "scheduler", "rng", "masks", "history"} <= set(state)
    assert (state["masks"] is None) == (kind == "teacher")

    model, hist, lines = run(kind, checkpoint=ckpt)
    assert f"{kind}: resuming from {ckpt} at epoch 2/3" in lines
    assert not any(f"epoch {e}/3:" in line for line in lines for e in (1, 2))  # epochs 1-2 not retrained
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    assert strip_timing(hist) == strip_timing(ref_hist)
    for (n, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), f"{n} differs between the resumed and the uninterrupted run"
    assert io.torch_load(ckpt)["epoch"] == 3  # final state kept until the stage has written its outputs


def test_checkpoint_every_n_and_off(tmp_path):
    ckpt = tmp_path / "t.pt"
    cfg = TrainParams(epochs=4, batch_size=64, eval_every=0, checkpoint_every=2)
    with pytest.raises(Killed):
        run("teacher", cfg=cfg, checkpoint=ckpt, kill_after=1)
    assert not ckpt.exists()  # epoch 1 is not a multiple of 2
    with pytest.raises(Killed):
        run("teacher", cfg=cfg, checkpoint=ckpt, kill_after=3)
    assert io.torch_load(ckpt)["epoch"] == 2
    ckpt.unlink()
    run("teacher", cfg=cfg, checkpoint=ckpt)
    assert io.torch_load(ckpt)["epoch"] == 4  # the last epoch is always saved
    ckpt.unlink()
    with pytest.raises(Killed):
        run("teacher", cfg=dataclasses.replace(cfg, checkpoint_every=0), checkpoint=ckpt, kill_after=3)
    assert not ckpt.exists()


def test_stale_or_broken_checkpoint_is_ignored_not_resumed(tmp_path):
    ckpt = tmp_path / "t.pt"
    cfg = TrainParams(epochs=2, batch_size=64, eval_every=0)
    with pytest.raises(Killed):
        run("teacher", cfg=cfg, checkpoint=ckpt, kill_after=1)
    lines = []
    _, hist, _ = run("teacher", cfg=dataclasses.replace(cfg, lr=0.1), checkpoint=ckpt, log=lines)
    assert any("ignoring stale" in line for line in lines) and not any("resuming" in line for line in lines)
    assert [r["epoch"] for r in hist] == [1, 2]

    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated (e.g. a full disk)
    lines = []
    _, hist, _ = run("teacher", cfg=cfg, checkpoint=ckpt, log=lines)
    assert any("ignoring resume checkpoint" in line for line in lines) and len(hist) == 2

    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    torch.save({"format": RESUME_FORMAT, "x": Evil()}, ckpt)
    lines = []
    run("teacher", cfg=cfg, checkpoint=ckpt, log=lines)
    assert any("weights_only" in line for line in lines) and not (tmp_path / "pwned").exists()
