import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdprune import params as kparams
from kdprune.params import ParamsError, flatten, load_params, params_from_dict
from tests.helpers import params_with, committed_params_text, default_params

ROOT = Path(__file__).resolve().parents[1]
BASE = default_params()


def with_value(dotted: str, value) -> dict:
    return params_with(dotted, value, BASE)


def test_repo_params_are_valid(tmp_path):
    (tmp_path / "params.yaml").write_text(committed_params_text())
    p = load_params(tmp_path / "params.yaml")
    assert p.prune.ratio == BASE["prune"]["ratio"]
    assert flatten(p.to_dict())["distill.temperature"] == BASE["distill"]["temperature"]


@pytest.fixture(autouse=True)
def many_cores(monkeypatch):
    """runtime.nproc_per_node is bounded by the cores: give these tests 64, whatever machine runs them."""
    monkeypatch.setattr(kparams, "usable_cores", lambda: 64)


@pytest.mark.parametrize("key,value,needle", [
    ("prune.ratio", 1.0, "[0, 1)"),
    ("prune.ratio", -0.1, "[0, 1)"),
    ("prune.ratio", "0.9", "must be a number"),
    ("prune.method", "random", "one of 'magnitude'"),
    ("model.depth", 21, "6n+2"),
    ("model.depth", 4, "6n+2"),
    ("model.arch", "vgg", "one of 'resnet'"),
    ("model.width", 0, "[1, 512]"),
    ("distill.temperature", 0, "[0.1, 100.0]"),
    ("distill.temperature", -1.0, "[0.1, 100.0]"),
    ("distill.alpha", 1.5, "[0, 1]"),
    ("distill.alpha", -0.1, "[0, 1]"),
    ("distill.variants", ["kd", "dark_magic"], "each entry must be one of"),
    ("distill.variants", [], "at least one"),
    ("distill.variants", ["kd", "kd"], "duplicates"),
    ("distill.variants", "kd", "a list of"),
    ("teacher.epochs", 0, "[1, 10000]"),
    ("teacher.epochs", 2.5, "an integer"),
    ("teacher.lr", 0, "(0, 10.0]"),
    ("teacher.checkpoint_every", -1, "[0, 10000]"),
    ("teacher.batch_size", 0, "[1, 65536]"),
    ("teacher.weight_decay", -1e-4, "[0, 0.1]"),
    ("teacher.warmup_frac", 1.0, "[0, 1)"),
    ("teacher.label_smoothing", 1.0, "[0, 1)"),
    ("teacher.eval_every", -1, "[0, 10000]"),
    ("distill.epochs", 0, "[1, 10000]"),
    ("distill.lr", float("inf"), "finite number"),
    ("distill.finetune_lr", float("nan"), "must be a number or null"),
    ("distill.finetune_lr", 0.0, "(0, 10.0]"),
    ("distill.finetune_lr", -0.2, "(0, 10.0]"),
    ("distill.finetune_lr", 11.0, "(0, 10.0]"),
    ("distill.finetune_lr", True, "must be a number or null"),
    ("distill.finetune_lr", "0.2", "must be a number or null"),
    ("data.test_subset", -1, "[0, 100,000,000]"),
    ("data.crop_padding", 9, "[0, 8]"),
    ("data.download", "no", "true or false"),
    ("runtime.bf16", 1, "true/false or one of 'auto'"),
    ("prune.include_last_fc", None, "true or false"),
    ("mlflow.enabled", "true", "true or false"),
    ("distill.checkpoint_every", 1.5, "an integer"),
    ("teacher.momentum", 1.0, "[0, 1)"),
    ("teacher.schedule", "step", "one of 'onecycle', 'cosine', 'constant'"),
    ("teacher.nesterov", "yes", "true or false"),
    ("data.name", "imagenet", "one of 'fashion_mnist', 'mnist', 'cifar10', 'cifar100', 'svhn'"),
    ("data.name", "cifar-10", "one of 'fashion_mnist'"),
    ("data.svhn_extra", "yes", "true or false"),
    ("data.svhn_extra", True, "applies to data.name = svhn only (it is 'fashion_mnist')"),
    ("data.train_subset", -5, "[0, 100,000,000]"),
    ("data.root", 3, "a string or null"),
    ("data.root", "../../elsewhere", "must stay inside the repository"),
    ("data.root", "data/../../x", "must stay inside the repository"),
    ("distill.variants", ["../../etc/kd"], "each entry must be one of"),
    ("seed", -1, "[0, 4294967295]"),
    ("runtime.threads", -2, "(0 = all cores"),
    ("runtime.device", "gpu", "one of 'auto', 'cpu', 'cuda'"),
    ("runtime.nproc_per_node", 0, "[1, 1024]"),
    ("runtime.nproc_per_node", 3, "divisible by runtime.nproc_per_node = 3"),  # teacher.batch_size 256
    ("evaluate.batch_size", 0, "[1, 65536]"),
    ("mlflow.experiment", " ", "non-empty"),
    ("runtime.deterministic", "yes", "true or false"),
    ("prune.min_layer_density", float("nan"), "finite number"),
    ("prune.min_layer_density", float("inf"), "finite number"),
    ("prune.min_layer_density", -0.01, "[0, 0.5]"),
    ("prune.min_layer_density", 0.6, "[0, 0.5]"),
    ("prune.min_layer_density", "0.1", "must be a number"),
    ("prune.min_layer_density", True, "must be a number"),
    ("prune.min_layer_density", 0.3, "at most 1 - prune.ratio = 0.2"),  # ratio 0.8: the floors would keep 30 %
])
def test_bad_values_name_key_value_and_rule(key, value, needle):
    with pytest.raises(ParamsError) as e:
        params_from_dict(with_value(key, value))
    msg = str(e.value)
    assert key in msg and repr(value) in msg and needle in msg, msg


@pytest.mark.parametrize("method", ["l1_filter", "channel"])
def test_min_layer_density_is_refused_for_structured_pruning(method):
    raw = params_with("prune.min_layer_density", 0.1, params_with("prune.method", method, BASE))
    with pytest.raises(ParamsError, match=r"prune.min_layer_density = 0.1 is invalid: applies to prune.method: "
                                          "magnitude only"):
        params_from_dict(raw)
    assert params_from_dict(params_with("prune.min_layer_density", 0, raw)).prune.min_layer_density == 0


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist", "cifar10", "cifar100", "svhn"])
def test_every_registered_dataset_is_a_valid_name(name):
    raw = with_value("data.name", name)
    raw["data"]["svhn_extra"] = name == "svhn"
    data = params_from_dict(raw).data
    assert data.name == name and data.svhn_extra is (name == "svhn")
    assert BASE["data"]["svhn_extra"] is False  # params.yaml lists it, off


@pytest.mark.parametrize("root", ["/usr/share/datasets/fashion-mnist", "data/raw", "./raw/../raw2"])
def test_explicit_or_inside_paths_are_allowed(root):
    assert params_from_dict(with_value("data.root", root)).data.root == root


def test_unknown_key_suggests_the_right_one():
    raw = copy.deepcopy(BASE)
    raw["prune"]["ration"] = 0.9
    with pytest.raises(ParamsError, match=r"unknown key 'prune.ration'; did you mean 'ratio'\?"):
        params_from_dict(raw)
    raw = copy.deepcopy(BASE)
    raw["distil"] = {}
    with pytest.raises(ParamsError, match="unknown key 'distil'; did you mean 'distill'"):
        params_from_dict(raw)


def test_missing_section_and_bad_yaml(tmp_path):
    raw = copy.deepcopy(BASE)
    del raw["prune"]
    with pytest.raises(ParamsError, match="missing section 'prune'"):
        params_from_dict(raw)
    with pytest.raises(ParamsError, match="section"):
        params_from_dict(with_value("teacher", 5))
    (tmp_path / "params.yaml").write_text("prune: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")


def test_stage_exits_nonzero_before_work(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_value("prune.ratio", 1.2)))
    r = subprocess.run([sys.executable, "-m", "stages.prune"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert "prune.ratio = 1.2 is invalid" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "models").exists()


LEAVES = sorted(flatten(BASE))


@pytest.mark.parametrize("key", LEAVES)
def test_every_key_rejects_a_wrong_type(key):
    with pytest.raises(ParamsError) as e:
        params_from_dict(with_value(key, {"oops": 1}))  # a mapping is the wrong type for every leaf
    assert key in str(e.value) and "is invalid: must be" in str(e.value), str(e.value)


@pytest.mark.parametrize("section", sorted(k for k, v in BASE.items() if isinstance(v, dict)))
def test_every_section_rejects_an_unknown_key(section):
    raw = copy.deepcopy(BASE)
    raw[section]["no_such_knob"] = 1
    with pytest.raises(ParamsError, match=f"unknown key '{section}.no_such_knob'"):
        params_from_dict(raw)


@pytest.mark.parametrize("section", ["data", "model", "teacher", "prune", "distill"])
def test_every_required_section_missing_is_named(section):
    raw = copy.deepcopy(BASE)
    del raw[section]
    with pytest.raises(ParamsError, match=f"missing section '{section}'"):
        params_from_dict(raw)


def with_model(arch, depth, width=16):
    raw = copy.deepcopy(BASE)
    raw["model"] = {"arch": arch, "depth": depth, "width": width}
    return raw


@pytest.mark.parametrize("arch,depth,width", [
    ("resnet", 110, 16), ("resnet_bottleneck", 164, 16), ("resnet_bottleneck", 29, 128),
    ("resnet_imagenet", 152, 64), ("resnet_imagenet", 50, 8),
])
def test_model_zoo_params_are_valid(arch, depth, width):
    m = params_from_dict(with_model(arch, depth, width)).model
    assert (m.arch, m.depth, m.width) == (arch, depth, width)


@pytest.mark.parametrize("arch,depth,width,key,needle", [
    ("resnet_bottleneck", 8, 16, "model.depth", "model.arch 'resnet_bottleneck' needs depth 9n+2"),
    ("resnet_bottleneck", 21, 16, "model.depth", "'resnet': depth 6n+2"),  # lists every arch
    ("resnet_imagenet", 164, 64, "model.depth", "needs depth 50, 101 or 152"),
    ("resnet_imagenet", 152, 128, "model.width", "[1, 64] for arch 'resnet_imagenet'"),
    ("resnet_bottleneck", 164, 129, "model.width", "[1, 128] for arch 'resnet_bottleneck'"),
    ("resnet", 8, 513, "model.width", "[1, 512] for arch 'resnet'"),
    ("resnet152", 152, 64, "model.arch", "one of 'resnet', 'resnet_bottleneck', 'resnet_imagenet'"),
])
def test_bad_model_names_key_value_and_what_exists(arch, depth, width, key, needle):
    with pytest.raises(ParamsError) as e:
        params_from_dict(with_model(arch, depth, width))
    value = {"model.arch": arch, "model.depth": depth, "model.width": width}[key]
    msg = str(e.value)
    assert f"{key} = {value!r} is invalid" in msg and needle in msg, msg


def test_nproc_per_node_is_bounded_by_the_cores(monkeypatch):
    """Old: runtime.nproc_per_node = 128 passed validation on 2 cores (16 processes there took +6.6 GB)."""
    monkeypatch.setattr(kparams, "usable_cores", lambda: 2)
    for n in (3, 128, 1024):  # 1024 divides every batch size here: the cores refuse it, not the batch size
        raw = params_with("runtime.nproc_per_node", n, params_with("teacher.batch_size", 1024,
                                                                   params_with("distill.batch_size", 1024, BASE)))
        with pytest.raises(ParamsError) as e:
            params_from_dict(raw)
        assert str(e.value) == (f"params.yaml: runtime.nproc_per_node = {n} is invalid: must be at most this machine's "
                                "2 usable cores (each DDP process, CPU or GPU, needs a core of its own; more only "
                                "contend for them, and every process holds its own copy of the model and data)")
    assert params_from_dict(with_value("runtime.nproc_per_node", 2)).runtime.nproc_per_node == 2


def test_usable_cores_are_this_process_cpu_affinity(monkeypatch):
    monkeypatch.undo()  # the real function, not the many_cores fixture's
    monkeypatch.setattr(kparams.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(kparams.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert kparams.usable_cores() == 3  # e.g. taskset -c 0-2 on a 64-core machine
    monkeypatch.delattr(kparams.os, "sched_getaffinity")  # macOS, Windows: every core
    assert kparams.usable_cores() == 64


def test_finetune_lr_needs_the_finetune_variant_and_changes_only_finetune():
    p = BASE | {"distill": {**BASE["distill"], "variants": ["kd"], "finetune_lr": 0.2}}
    with pytest.raises(ParamsError, match=r"distill.finetune_lr = 0.2 is invalid: applies to the finetune variant"):
        params_from_dict(p)
    d = params_from_dict(BASE | {"distill": {**BASE["distill"], "lr": 0.01, "finetune_lr": 0.2}}).distill
    from kdprune.train.recovery import train_settings
    assert train_settings(d, "finetune").lr == 0.2 and train_settings(d, "finetune").epochs == d.epochs
    assert train_settings(d, "kd").lr == 0.01 and train_settings(d, "scratch").lr == 0.01
    unset = params_from_dict(BASE).distill
    assert unset.finetune_lr is None and train_settings(unset, "finetune") is unset
