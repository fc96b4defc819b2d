import pytest
import torch

from kdprune import io
from kdprune.models import build_model, resnet_spec, spec_of


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
    io.save_checkpoint(tmp_path / "m.pt", model, masks=masks, meta={"dataset": "x"})
    loaded, loaded_masks, meta = io.load_checkpoint(tmp_path / "m.pt", expect_classes=10)
    assert torch.equal(loaded.eval()(x), model(x))
    assert torch.equal(loaded_masks["fc.weight"], masks["fc.weight"]) and meta == {"dataset": "x"}


def test_checkpoint_class_mismatch_and_unsafe_pickle(tmp_path):
    model = build_model(resnet_spec(8, 8, 1, 10))
    io.save_checkpoint(tmp_path / "m.pt", model)
    with pytest.raises(io.CheckpointError, match="10 output classes but the dataset has 100"):
        io.load_checkpoint(tmp_path / "m.pt", expect_classes=100)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": io.CHECKPOINT_FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(io.CheckpointError, match="weights_only"):
        io.load_checkpoint(tmp_path / "evil.pt")


def test_checkpoint_spec_mismatch_is_clear(tmp_path):
    model = build_model(resnet_spec(8, 8, 1, 10))
    ckpt = {"format": io.CHECKPOINT_FORMAT, "spec": resnet_spec(8, 16, 1, 10),
            "state_dict": model.state_dict(), "masks": None, "meta": {}}
    torch.save(ckpt, tmp_path / "m.pt")
    with pytest.raises(io.CheckpointError, match="do not match the stored architecture spec"):
        io.load_checkpoint(tmp_path / "m.pt")


def test_torch_save_is_byte_identical_whatever_the_temp_name(tmp_path):
    """io.torch_save goes through a random temp file; the bytes must not depend on its name (DVC hashes)."""
    model = build_model(resnet_spec(8, 4, 1, 10))
    io.save_checkpoint(tmp_path / "a.pt", model)
    io.save_checkpoint(tmp_path / "b.pt", model)
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
