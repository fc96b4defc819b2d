"""Models from anywhere (issue #11): torchvision classifiers, the user's own factory, imported teachers, channel
pruning of any architecture, KD and attention transfer on named layers, reload without pickling, ONNX."""
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from kdprune import checkpoint, io, metrics
from kdprune.export import ExportError, export_compact, export_onnx, load_compact, onnx_available, onnx_max_abs_diff
from kdprune.train.features import FeatureError
from kdprune.train.losses import AttentionTransferError
from kdprune.models import build_model, record_pruning, spec_from_params, spec_of
from kdprune.models import torchvision as tvmodels
from kdprune.archs import TORCHVISION_CLASSIFIERS
from kdprune.params import DistillParams, ModelParams, params_from_dict, ParamsError, RuntimeParams
from kdprune.prune.counts import count_params
from kdprune.prune.masks import apply_masks, global_magnitude_masks
from kdprune.prune.channel import channel_prune, ChannelPruningError
from kdprune.teacher import TeacherError, import_weights
from kdprune.train.loop import fit
from kdprune.train.objective import Objective
from tests.helpers import default_params

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (3, 32, 32)
CLASSES = 10
# builder -> (a layer for attention transfer, channel importance); the single-channel case is the last one.
# All at 32x32 except vgg11_bn, at its natural 224x224: its AdaptiveAvgPool2d((7, 7)) on the 1x1 map of a 32x32
# input has no ONNX export (torch: "output size that are not factor of input size").
# vgg11_bn is pruned more: its 25088 x 4096 classifier (103M weights) makes every step slow.
SIDE, RATIO = {"vgg11_bn": 224}, {"vgg11_bn": 0.5}
CASES = {
    ("resnet18", 3): ("layer2", "l1"),
    ("resnet50", 3): ("layer2", "l1"),
    ("mobilenet_v2", 3): ("features.6", "taylor"),
    ("mobilenet_v3_small", 3): ("features.3", "l1"),
    ("mobilenet_v3_large", 3): ("features.6", "l2"),
    ("efficientnet_b0", 3): ("features.3", "bn_scale"),
    ("regnet_y_400mf", 3): ("trunk_output.block2", "l1"),
    ("shufflenet_v2_x1_0", 3): ("stage2", "l1"),
    ("vgg11_bn", 3): ("features.7", "l1"),
    ("densenet121", 3): ("features.denseblock2", "l1"),
    ("convnext_tiny", 3): ("features.1", "l2"),
    ("mobilenet_v3_small", 1): ("features.3", "l1"),
}
RUNTIME = RuntimeParams(threads=1, bf16=False, channels_last=False, device="cpu")
KD = DistillParams(epochs=1, batch_size=4, lr=0.01, eval_every=0, checkpoint_every=0, temperature=4.0, alpha=0.9)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Where the parametrised test leaves each pruned, distilled student and its logits for the fresh-process reload."""
    return tmp_path_factory.mktemp("byo")


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as the reloading process: bit-identical logits
    yield
    torch.set_num_threads(old)


def batches(channels: int, n: int = 1, seed: int = 0, side: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, channels, side, side, generator=g), torch.randint(0, CLASSES, (4,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("name,channels", list(CASES), ids=[f"{n}-{c}ch" for n, c in CASES])
def test_torchvision_model_prunes_distils_reloads_and_exports(name, channels, saved):
    layer, imp = CASES[(name, channels)]
    torch.manual_seed(0)
    spec = {"arch": "torchvision", "name": name, "num_classes": CLASSES, "in_channels": channels}
    side = SIDE.get(name, 32)
    shape = (channels, side, side)
    teacher = build_model(spec).eval()
    data = batches(channels, side=side)

    # channel pruning: physically fewer parameters; the spec (with the pruning history) is plain data, replayed
    # on a fresh model by the fresh-process test below
    student = copy.deepcopy(teacher)
    result = channel_prune(student, torch.zeros(1, *shape), imp, RATIO.get(name, 0.3), batches=lambda: iter(data))
    record_pruning(student, result.history, shape)
    assert count_params(student)[0] < count_params(teacher)[0] and result.mac_reduction > 1.2
    assert json.loads(json.dumps(spec_of(student))) == spec_of(student)

    # magnitude pruning works on every model: exactly the ratio of its conv and linear weights
    masks = global_magnitude_masks(student, 0.5)
    total = sum(m.numel() for m in masks.values())
    assert abs(sum(int((~m).sum()) for m in masks.values()) - total // 2) <= 1

    # one KD step (with attention transfer on a named layer) keeps the mask: the non-zeros never grow
    apply_masks(student, masks)
    nonzero = {k: int(torch.count_nonzero(p)) for k, p in student.named_parameters() if k in masks}
    before = copy.deepcopy(student.state_dict())
    fit(student, data, data, KD, runtime=RUNTIME, masks=masks, name=name, log=lambda m: None,
        objective=Objective(teacher=teacher, alpha=0.9, temperature=4.0, at_beta=100.0, at_layers=[layer]))
    params = dict(student.named_parameters())
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())  # it trained
    for k, m in masks.items():
        assert not params[k][~m].any() and int(torch.count_nonzero(params[k])) <= nonzero[k]

    # save (reloaded in a fresh process by the test below) and ONNX
    student.eval()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = student(x)
    assert torch.isfinite(logits).all()
    checkpoint.save_checkpoint(saved / f"{name}-{channels}.pt", student, masks=masks)
    torch.save({"x": x, "logits": logits}, saved / f"{name}-{channels}.logits")
    if onnx_available():
        path = saved / f"{name}-{channels}.onnx"
        export_onnx(student, path, shape)
        assert onnx_max_abs_diff(student, path, x) <= 1e-3
        if channels == 1:  # the repeat to 3 channels is inside the exported graph
            import onnx

            graph = onnx.load(str(path)).graph
            assert graph.input[0].type.tensor_type.shape.dim[1].dim_value == 1
            assert any(n.op_type in ("Tile", "Expand", "Concat") for n in graph.node)


RELOAD = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from kdprune import checkpoint
    torch.set_num_threads(1)
    for ckpt in sorted(Path(sys.argv[1]).glob("*.pt")):
        model, masks, _ = checkpoint.load_checkpoint(ckpt)
        ref = torch.load(ckpt.with_suffix(".logits"), weights_only=True)
        with torch.inference_mode():
            got = model.eval()(ref["x"])
        assert torch.equal(got, ref["logits"]), (ckpt.name, float((got - ref["logits"]).abs().max()))
        assert masks and all(not p[~masks[k]].any() for k, p in model.named_parameters() if k in masks)
        print(ckpt.stem)
""")


def test_every_student_reloads_in_a_fresh_process_with_identical_logits(saved):
    names = sorted(p.stem for p in saved.glob("*.pt"))
    if not names:
        pytest.skip("runs after the parametrised test, on what it saved")
    r = subprocess.run([sys.executable, "-c", RELOAD, str(saved)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == names


def test_the_params_list_of_torchvision_classifiers_is_the_installed_one():
    assert TORCHVISION_CLASSIFIERS == tvmodels.classifiers()


def test_an_unknown_torchvision_name_lists_the_valid_ones():
    raw = default_params()
    raw["model"] = {"arch": "torchvision", "name": "resnet19"}
    with pytest.raises(ParamsError, match="model.name = 'resnet19'.*resnet18.*vgg11_bn"):
        params_from_dict(raw)
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet19'.*convnext_tiny"):
        build_model({"arch": "torchvision", "name": "resnet19", "num_classes": 10, "in_channels": 3})


@pytest.mark.parametrize("factory", ["tests.custom_models", "os:system;rm", "../x:y", "a.b:c.d", "a:b:c", " a:b",
                                     "x" * 300 + ":f"])
def test_model_factory_must_be_module_colon_function(factory):
    raw = default_params()
    raw["model"] = {"arch": "custom", "factory": factory}
    with pytest.raises(ParamsError, match="model.factory"):
        params_from_dict(raw)


@pytest.mark.parametrize("kwargs", [{"a": {"b": 1}}, {"num_classes": 3}, {"x": [[[1]]]}, {"x": "y" * 5000},
                                    {f"k{i}": i for i in range(100)}, {"not an identifier": 1}])
def test_model_kwargs_are_small_plain_data(kwargs):
    raw = default_params()
    raw["model"] = {"arch": "custom", "factory": "tests.custom_models:tiny_net", "kwargs": kwargs}
    with pytest.raises(ParamsError, match="model.kwargs"):
        params_from_dict(raw)


def test_a_custom_factory_builds_prunes_and_reloads_with_its_kwargs(tmp_path):
    factory = "tests.custom_models:tiny_net"
    mp = ModelParams(arch="custom", factory=factory, kwargs={"width": 12})
    mp.validate("model")
    spec = spec_from_params(mp, 1, 5)
    model = build_model(spec, allowed_factory=factory).eval()
    assert model.stem[0].in_channels == 1 and model.stem[0].out_channels == 12  # in_channels and kwargs passed
    result = channel_prune(model, torch.zeros(1, 1, 16, 16), "l1", target_macs_reduction=1.5)
    assert result.mac_reduction >= 1.5 and result.ratio < 0.95  # stopped once the target was reached
    record_pruning(model, result.history, (1, 16, 16))
    assert model.stem[0].out_channels < 12
    checkpoint.save_checkpoint(tmp_path / "m.pt", model)
    loaded, _, _ = checkpoint.load_checkpoint(tmp_path / "m.pt", allowed_factory=factory)
    x = torch.randn(2, 1, 16, 16)
    with torch.inference_mode():
        assert torch.equal(loaded.eval()(x), model(x))
    # a factory without in_channels gets single-channel data repeated to 3 channels
    rgb = build_model({**spec_from_params(ModelParams(arch="custom", factory="tests.custom_models:rgb_only"), 1, 5)},
                      allowed_factory="tests.custom_models:rgb_only")
    assert rgb.stem[0].in_channels == 3 and rgb(torch.zeros(2, 1, 16, 16)).shape == (2, 5)


@pytest.mark.parametrize("factory", ["tests.hostile_factory:make", "os:system"])
def test_a_model_file_naming_a_factory_never_imports_it(tmp_path, monkeypatch, factory):
    """A checkpoint or .kdc file is data: the factory it names is imported only when params.yaml names it."""
    marker = tmp_path / "imported"
    monkeypatch.setenv("KDPRUNE_HOSTILE_MARKER", str(marker))
    sys.modules.pop("tests.hostile_factory", None)
    good = build_model({"arch": "custom", "factory": "tests.custom_models:tiny_net", "kwargs": {}, "num_classes": 3,
                        "in_channels": 3}, allowed_factory="tests.custom_models:tiny_net")
    checkpoint.save_checkpoint(tmp_path / "m.pt", good)
    export_compact(good, tmp_path / "m.kdc")
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    ckpt["spec"]["factory"] = factory
    torch.save(ckpt, tmp_path / "hostile.pt")
    for allowed in (None, "tests.custom_models:tiny_net"):
        with pytest.raises(io.CheckpointError, match=f"names the custom factory '{factory}'"):
            checkpoint.load_checkpoint(tmp_path / "hostile.pt", allowed_factory=allowed)
    # the compact file: the same header with the hostile factory
    import struct
    import zlib

    blob = (tmp_path / "m.kdc").read_bytes()
    (hlen,) = struct.unpack("<I", blob[6:10])
    header = json.loads(zlib.decompress(blob[10:10 + hlen]))
    header["spec"]["factory"] = factory
    new = zlib.compress(json.dumps(header).encode())
    (tmp_path / "hostile.kdc").write_bytes(blob[:6] + struct.pack("<I", len(new)) + new + blob[10 + hlen:])
    with pytest.raises(ExportError, match=f"names the custom factory '{factory}'"):
        load_compact(tmp_path / "hostile.kdc")
    assert load_compact(tmp_path / "m.kdc", allowed_factory="tests.custom_models:tiny_net")[0] is not None
    assert not marker.exists() and "tests.hostile_factory" not in sys.modules


@pytest.mark.parametrize("history,match", [
    ([["nope", True, [0]]], "no prunable module 'nope'"),
    ([["stem.0", True, [0, 0]]], "distinct"),
    ([["stem.0", True, [99]]], "below it"),
    ([["stem.0", True, list(range(8))]], "leave at least one"),
    ([["stem.0", "yes", [0]]], "history\\[0\\]"),
    ([["stem.0", True, [-1]]], "integers >= 0"),
    ("x", "must be a list"),
])
def test_a_pruning_history_is_checked_before_it_is_replayed(history, match):
    spec = {"arch": "custom", "factory": "tests.custom_models:tiny_net", "kwargs": {}, "num_classes": 3,
            "in_channels": 3, "pruning": {"input_shape": [3, 16, 16], "history": history}}
    with pytest.raises(ValueError, match=match):
        build_model(spec, allowed_factory="tests.custom_models:tiny_net")


def test_single_channel_models_keep_torchvisions_state_dict_keys():
    import torchvision

    ours = build_model({"arch": "torchvision", "name": "resnet18", "num_classes": 10, "in_channels": 1})
    plain = torchvision.models.resnet18(num_classes=10)
    assert list(ours.state_dict()) == list(plain.state_dict())
    ours.load_state_dict(plain.state_dict())  # a user's torch.save(model.state_dict()) loads as it is
    x = torch.rand(2, 1, 32, 32)
    with torch.inference_mode():
        assert torch.equal(ours.eval()(x), plain.eval()(x.repeat(1, 3, 1, 1)))


def test_channel_pruning_of_a_zoo_model_is_described_by_its_channel_counts():
    from kdprune.models import resnet_spec

    model = build_model(resnet_spec(8, 8, 1, 10)).eval()
    result = channel_prune(model, torch.zeros(1, 1, 28, 28), "l2", 0.5)
    record_pruning(model, result.history, (1, 28, 28))  # the zoo's spec is read from its modules
    spec = spec_of(model)
    assert "pruning" not in spec and spec["channels"]["stages"][0] < 8 and model.fc.out_features == 10
    fresh = build_model(spec)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(fresh.eval()(x), model(x))


def test_channel_pruning_keeps_the_classifier_whole():
    model = build_model({"arch": "torchvision", "name": "resnet18", "num_classes": 7, "in_channels": 3})
    channel_prune(model, torch.zeros(1, 3, 32, 32), "l1", 0.5)
    assert model.fc.out_features == 7 and model.fc.in_features == 256


def test_an_unreachable_mac_target_is_an_error():
    model = build_model({"arch": "custom", "factory": "tests.custom_models:tiny_net", "kwargs": {"width": 2},
                         "num_classes": 3, "in_channels": 3}, allowed_factory="tests.custom_models:tiny_net")
    with pytest.raises(ChannelPruningError, match="target_macs_reduction = 90"):
        channel_prune(model, torch.zeros(1, 3, 16, 16), "l1", target_macs_reduction=90.0)


# --- attention transfer on named layers -------------------------------------------------------------------------

def _tv(name="resnet18"):
    return build_model({"arch": "torchvision", "name": name, "num_classes": CLASSES, "in_channels": 3})


def test_attention_transfer_layers_must_exist_and_are_listed():
    data = batches(3)
    with pytest.raises(FeatureError, match="'layer9'.*some valid names: conv1, bn1"):
        fit(_tv(), data, data, KD, runtime=RUNTIME, log=lambda m: None,
            objective=Objective(teacher=_tv(), alpha=0.9, at_beta=1.0, at_layers=["layer9"]))
    with pytest.raises(FeatureError, match="at_layers is empty"):
        fit(_tv(), data, data, KD, runtime=RUNTIME, objective=Objective(teacher=_tv(), alpha=0.9, at_beta=1.0),
            log=lambda m: None)


def test_attention_transfer_maps_of_other_sizes_are_an_error():
    data = batches(3)
    teacher = _tv("resnet18")  # its layer2 downsamples twice as much as the student's: other spatial sizes
    teacher.layer2[0].conv1.stride = (4, 4)
    teacher.layer2[0].downsample[0].stride = (4, 4)
    with pytest.raises(AttentionTransferError, match="layer 'layer2' maps are \\(4, 4\\) \\(student\\) and \\(2, 2\\)"):
        fit(_tv("resnet18"), data, data, KD, runtime=RUNTIME, log=lambda m: None,
            objective=Objective(teacher=teacher, alpha=0.9, at_beta=1.0, at_layers=["layer2"]))


def test_at_beta_without_at_layers_on_a_torchvision_model_is_a_params_error():
    raw = default_params()
    raw["model"] = {"arch": "torchvision", "name": "resnet18"}
    raw["distill"]["at_beta"] = 100.0
    with pytest.raises(ParamsError, match="distill.at_layers"):
        params_from_dict(raw)
    raw["distill"]["at_layers"] = ["layer2", "layer3"]
    assert params_from_dict(raw).distill.at_layers == ["layer2", "layer3"]


# --- imported teachers --------------------------------------------------------------------------------------------

def teacher_params(tmp_path, **teacher):
    raw = default_params()
    raw["model"] = {"arch": "torchvision", "name": "resnet18"}
    raw["teacher"].update(teacher)
    return params_from_dict(raw)


def teacher_args(params) -> tuple:
    """What import_weights reads of the params: the teacher section and model.name."""
    return params.teacher, params.model.name


def test_a_plain_state_dict_and_a_kdprune_checkpoint_are_imported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teachers").mkdir()
    user = _tv()  # what a user's own script trained and saved
    torch.save(user.state_dict(), tmp_path / "teachers" / "plain.pt")
    torch.save({"model": torch.nn.DataParallel(user).state_dict()}, tmp_path / "teachers" / "wrapped.pt")
    checkpoint.save_checkpoint(tmp_path / "teachers" / "kdprune.pt", user)
    x = torch.randn(2, *SHAPE)
    for f in ("plain.pt", "wrapped.pt", "kdprune.pt"):
        params = teacher_params(tmp_path, init="checkpoint", checkpoint=f"teachers/{f}", epochs=0)
        model = _tv()
        assert "imported" in import_weights(model, params.teacher, params.model.name, SHAPE)
        with torch.inference_mode():
            assert torch.equal(model.eval()(x), user.eval()(x))


def test_mismatched_teacher_weights_name_the_first_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teachers").mkdir()
    state = _tv().state_dict()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(5, 512)
    torch.save(state, tmp_path / "teachers" / "bad.pt")
    params = teacher_params(tmp_path, init="checkpoint", checkpoint="teachers/bad.pt")
    with pytest.raises(io.CheckpointError, match="1 missing keys \\(layer1.0.conv1.weight\\), 1 unexpected keys "
                                                 "\\(extra.weight\\), 1 shape mismatches \\(fc.weight \\(5, 512\\)"):
        import_weights(_tv(), params.teacher, params.model.name, SHAPE)
    torch.save({"weights": [1, 2]}, tmp_path / "teachers" / "junk.pt")
    with pytest.raises(io.CheckpointError, match="neither a kdprune checkpoint nor a state_dict"):
        import_weights(_tv(), *teacher_args(teacher_params(tmp_path, init="checkpoint", checkpoint="teachers/junk.pt")),
                       SHAPE)


def test_teacher_checkpoint_must_stay_inside_teachers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teachers").mkdir()
    (tmp_path / "outside.pt").write_bytes(b"x")
    (tmp_path / "teachers" / "link.pt").symlink_to(tmp_path / "outside.pt")
    for path, match in [("outside.pt", "inside teachers/"), ("/etc/passwd", "inside teachers/"),
                        ("teachers/../outside.pt", "inside teachers/"), ("teachers/link.pt", "outside teachers/"),
                        (None, "needs the file"), ("teachers", "outside teachers/")]:
        with pytest.raises(ParamsError, match=match):
            teacher_params(tmp_path, init="checkpoint", checkpoint=path)
    with pytest.raises(ParamsError, match="teacher.checkpoint"):
        teacher_params(tmp_path, init="scratch", checkpoint="teachers/x.pt")


def test_teacher_epochs_zero_only_for_an_imported_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match="0 is allowed only with teacher.init checkpoint or pretrained"):
        teacher_params(tmp_path, init="scratch", epochs=0)
    assert teacher_params(tmp_path, init="pretrained", epochs=0).teacher.epochs == 0
    raw = default_params()
    raw["teacher"]["init"] = "pretrained"
    with pytest.raises(ParamsError, match="needs model.arch: torchvision"):
        params_from_dict(raw)


def test_pretrained_offline_says_which_file_is_missing_and_where(tmp_path, monkeypatch):
    """Never a download: with an empty TORCH_HOME the error names the file and torch's cache path, at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)
    params = teacher_params(tmp_path, init="pretrained", epochs=0)
    want = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(io.CheckpointError, match=f"{want} is missing.*download.pytorch.org"):
        import_weights(_tv(), params.teacher, params.model.name, SHAPE)


def test_pretrained_weights_from_the_cache_load_and_a_new_class_count_needs_training(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)
    imagenet = build_model({"arch": "torchvision", "name": "resnet18", "num_classes": 1000, "in_channels": 3})
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(imagenet.state_dict(), cache / "resnet18-f37072fd.pth")
    with pytest.raises(TeacherError, match="1000 classes and the data 10.*teacher.epochs > 0"):
        import_weights(_tv(), *teacher_args(teacher_params(tmp_path, init="pretrained", epochs=0)), SHAPE)
    model = _tv()
    assert "new fc" in import_weights(model, *teacher_args(teacher_params(tmp_path, init="pretrained", epochs=1)),
                                       SHAPE)
    assert torch.equal(model.layer1[0].conv1.weight, imagenet.layer1[0].conv1.weight)


# --- the stages, end to end on tiny data -----------------------------------------------------------------------

def test_stages_run_a_torchvision_model_with_an_imported_teacher_and_channel_pruning(tmp_path):
    """prepare -> train_teacher (a plain-script state_dict, epochs 0: measured only) -> prune (channel, taylor, a MAC
    target) -> distill (kd with attention transfer on a named layer, finetune) -> evaluate (ONNX, compact, latency)."""
    import shutil

    from tests.helpers import write_fake_dataset

    raw = write_fake_dataset(tmp_path / "raw", n_train=200, n_test=100)
    repo = tmp_path / "repo"
    for item in ("kdprune", "stages", "teachers"):
        shutil.copytree(ROOT / item, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
    torch.manual_seed(3)
    user = build_model({"arch": "torchvision", "name": "mobilenet_v3_small", "num_classes": 10, "in_channels": 1})
    torch.save(user.state_dict(), repo / "teachers" / "mine.pt")  # what the user's own script writes
    p = default_params()
    p["data"].update(root=str(raw), download=False)
    p["model"] = {"arch": "torchvision", "name": "mobilenet_v3_small"}
    p["runtime"].update(threads=1, bf16=False)
    p["teacher"].update(init="checkpoint", checkpoint="teachers/mine.pt", epochs=0)
    p["prune"].update(method="channel", importance="taylor", target_macs_reduction=1.5)
    p["distill"].update(epochs=1, batch_size=50, variants=["kd", "finetune"], at_beta=10.0, at_layers=["features.3"])
    p["evaluate"].update(latency_repeats=1)
    p["mlflow"]["enabled"] = False
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(CI="true", OMP_NUM_THREADS="1")
    for st in ("prepare", "train_teacher", "prune", "distill", "evaluate"):
        r = subprocess.run([sys.executable, "-m", f"stages.{st}"], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"{st}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    m = metrics.collect(repo)  # each metric from its one file
    loaded = checkpoint.load_checkpoint(repo / "models/teacher.pt")[0]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), user.state_dict().values()))
    assert m["reached_macs_reduction"] >= 1.5
    assert abs(m["mac_reduction"] - m["reached_macs_reduction"]) < 1e-9 and m["params_pruned"] < m["params_teacher"]
    assert m["params_kd"] == m["params_pruned"] < m["params_teacher"]
    ev = m
    if onnx_available():
        assert ev["onnx_max_abs_diff_kd"] <= 1e-3 and (repo / "models/export/kd.onnx").exists()
    assert load_compact(repo / "models/export/kd.kdc")[0] is not None


@pytest.mark.parametrize("shape", [[3, 5000, 5000], [1, 16, 16], [3, 16], "3x16x16", [3, 16.0, 16]])
def test_the_traced_input_shape_of_a_pruning_history_is_bounded(shape):
    spec = {"arch": "torchvision", "name": "resnet18", "num_classes": 3, "in_channels": 3,
            "pruning": {"input_shape": shape, "history": []}}
    with pytest.raises(ValueError, match="pruning.input_shape"):
        build_model(spec)
