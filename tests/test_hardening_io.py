"""Hardened I/O (issue #13): lying compact files and checkpoints, a teacher of another architecture,
a full disk, file modes, NaN in numeric checks. Each test reproduces a probe that failed before."""
import copy
import errno
import json
import math
import os
import pathlib
import stat
import struct
import zlib
from types import SimpleNamespace

import pytest
import torch

from kdprune import checkpoint, export, io, stage
from kdprune.export import MAGIC, ExportError, export_compact, load_compact
from kdprune.io import CheckpointError, OutputError
from kdprune.models import MAX_PARAMS, build_model, model_spec, resnet_spec, spec_param_count
from kdprune.params import ModelParams, ParamsError, params_from_dict, safe_load_yaml
from kdprune.schema import show
from tests.helpers import default_params
from kdprune.prune.masks import apply_masks, global_magnitude_masks

# ---------------------------------------------------------------- compact files (.kdc) that lie


def _sparse_model():
    torch.manual_seed(0)
    model = build_model(resnet_spec(8, 4, 1, 10))
    apply_masks(model, global_magnitude_masks(model, 0.9))  # bitmask entries
    return model


def _split(blob: bytes) -> tuple[dict, bytes]:
    (hlen,) = struct.unpack("<I", blob[len(MAGIC):len(MAGIC) + 4])
    pos = len(MAGIC) + 4
    return json.loads(zlib.decompress(blob[pos:pos + hlen])), blob[pos + hlen:]


def _pack(header_bytes: bytes, payload: bytes, compress=True) -> bytes:
    raw = zlib.compress(header_bytes) if compress else header_bytes
    return MAGIC + struct.pack("<I", len(raw)) + raw + payload


@pytest.fixture(scope="module")
def good_kdc(tmp_path_factory):
    path = tmp_path_factory.mktemp("kdc") / "good.kdc"
    export_compact(_sparse_model(), path, meta={"variant": "kd"})
    return _split(path.read_bytes())


def _first(header, encoding):
    return next(e for e in header["tensors"] if e["encoding"] == encoding)


def _lie_nnz_shifted(h):  # nnz of two bitmask tensors off by one each way: the payload size still matches
    a, b = [e for e in h["tensors"] if e["encoding"] == "bitmask" and 0 < e["nnz"] < math.prod(e["shape"])][:2]
    a["nnz"] += 1
    b["nnz"] -= 1


def _dup_name(h):
    h["tensors"][1]["name"] = h["tensors"][0]["name"]


LIES = {  # probe -> (edit of a good header, what the error must say)
    "list header": (lambda h: ["not", "an", "object"], "JSON list, expected an object"),
    "no tensors": (lambda h: h.pop("tensors"), "the header has keys"),
    "tensors not a list": (lambda h: h.update(tensors={"a": 1}), "tensors must be a list of objects"),
    "meta not an object": (lambda h: h.update(meta=[1]), "meta is a list"),
    "unknown arch": (lambda h: h["spec"].update(arch="vgg"), "unknown model arch 'vgg'"),
    "spec a string": (lambda h: h.update(spec="resnet"), "a model spec must be a dict"),
    "depth 600000002": (lambda h: h["spec"].update(depth=600000002), "at most 1202"),
    "width 10**9": (lambda h: h["spec"]["channels"].update(stages=[10**9] * 3), "parameters, more than"),
    "num_classes 10**12": (lambda h: h["spec"].update(num_classes=10**12), "parameters, more than"),
    "huge shape": (lambda h: h["tensors"][0].update(shape=[10**12, 10**12]), "but the spec's model has"),
    "negative shape": (lambda h: h["tensors"][0].update(shape=[-4, 1, 3, 3]), "non-negative integers"),
    "float shape": (lambda h: h["tensors"][0].update(shape=[4.0, 1, 3, 3]), "non-negative integers"),
    "bool shape": (lambda h: h["tensors"][0].update(shape=[True, 1, 3, 3]), "non-negative integers"),
    "nnz > numel": (lambda h: _first(h, "bitmask").update(nnz=10**9), "must be an integer in [0,"),
    "nnz negative": (lambda h: _first(h, "bitmask").update(nnz=-1), "must be an integer in [0,"),
    "nnz float": (lambda h: _first(h, "bitmask").update(nnz=3.0), "must be an integer in [0,"),
    "nnz vs mask": (_lie_nnz_shifted, "set bits but nnz"),
    "duplicate name": (_dup_name, "more than once"),
    "name not a string": (lambda h: h["tensors"][0].update(name=7), "string name"),
    "unknown dtype": (lambda h: _first(h, "int").update(dtype="complex128"), "dtype 'complex128'"),
    "int data too long": (lambda h: _first(h, "int").update(data=[0] * 5), "list of 1 integers"),
    "int data overflow": (lambda h: _first(h, "int").update(data=[2**70]), "do not fit int64"),
    "unknown encoding": (lambda h: h["tensors"][0].update(encoding="zip"), "encoding 'zip'"),
    "float tensor as int": (lambda h: (e := _first(h, "dense")).update(encoding="int", dtype="int64",
                                                                       data=[0] * math.prod(e["shape"])),
                            "does not fit its dtype"),
}


@pytest.mark.parametrize("probe", LIES)
def test_a_lying_compact_header_is_one_export_error_naming_the_file(probe, good_kdc, tmp_path):
    header, payload = copy.deepcopy(good_kdc[0]), good_kdc[1]
    edit, needle = LIES[probe]
    header = edit(header) if probe == "list header" else (edit(header), header)[1]
    path = tmp_path / "lie.kdc"
    path.write_bytes(_pack(json.dumps(header).encode(), payload))
    with pytest.raises(ExportError) as e:
        load_compact(path)
    msg = str(e.value)
    assert str(path) in msg and needle in msg and "\n" not in msg, msg


def test_the_good_header_loads(good_kdc, tmp_path):  # the probes above edit a file that loads
    path = tmp_path / "good.kdc"
    path.write_bytes(_pack(json.dumps(good_kdc[0]).encode(), good_kdc[1]))
    assert load_compact(path)[1] == {"variant": "kd"}


@pytest.mark.parametrize("probe", ["json padded past the cap", "zlib bomb of zeros", "deep nesting",
                                   "header length field", "header past the end", "trailing zlib bytes"])
def test_the_header_is_capped_before_it_is_inflated_or_parsed(probe, good_kdc, tmp_path):
    header, payload = good_kdc
    text = json.dumps(header).encode()
    path = tmp_path / "bomb.kdc"
    cap = export.MAX_HEADER_JSON_BYTES
    if probe == "json padded past the cap":  # valid JSON: it loaded before
        blob, needle = _pack(text + b" " * cap, payload), "inflates to more than"
    elif probe == "zlib bomb of zeros":
        blob, needle = _pack(b"\0" * (4 * cap), payload), "inflates to more than"
    elif probe == "deep nesting":  # a RecursionError in json before
        blob, needle = _pack(b"[" * 200_000 + b"]" * 200_000, payload), "not JSON"
    elif probe == "header length field":
        blob, needle = MAGIC + struct.pack("<I", 2**32 - 1) + b"x" * 100, "more than the"
    elif probe == "header past the end":
        blob, needle = MAGIC + struct.pack("<I", 1000) + b"x" * 100, "truncated or corrupted"
    else:
        raw = zlib.compress(text) + b"junk"
        blob, needle = MAGIC + struct.pack("<I", len(raw)) + raw + payload, "followed by other bytes"
    path.write_bytes(blob)
    with pytest.raises(ExportError) as e:
        load_compact(path)
    assert str(path) in str(e.value) and needle in str(e.value), str(e.value)


def test_spec_param_count_is_the_built_models_count():
    from kdprune.prune.filters import l1_filter_prune
    from kdprune.models import spec_of

    pruned = build_model(resnet_spec(14, 8, 3, 10))
    l1_filter_prune(pruned, 0.5, torch.zeros(1, 3, 32, 32))
    specs = [model_spec("resnet", 14, 8, 1, 10), model_spec("resnet_bottleneck", 20, 4, 3, 10),
             model_spec("resnet_imagenet", 50, 4, 3, 100), spec_of(pruned)]
    for spec in specs:
        assert spec_param_count(spec) == sum(p.numel() for p in build_model(spec).parameters()), spec["arch"]
    huge = model_spec("resnet", 8, 16, 1, 10)
    huge["num_classes"] = MAX_PARAMS
    with pytest.raises(ValueError, match="parameters, more than"):
        build_model(huge)


# ---------------------------------------------------------------- checkpoints whose spec lies


def _ckpt(tmp_path, edit):
    ckpt = {"format": checkpoint.CHECKPOINT_FORMAT, "spec": resnet_spec(8, 4, 1, 10),
            "state_dict": build_model(resnet_spec(8, 4, 1, 10)).state_dict(), "masks": None, "meta": {}}
    edit(ckpt)
    torch.save(ckpt, tmp_path / "c.pt")
    return tmp_path / "c.pt"


@pytest.mark.parametrize("probe,edit,needle", [
    ("width 10**9", lambda c: c["spec"]["channels"].update(stages=[10**9] * 3), "parameters, more than"),
    ("num_classes 10**12", lambda c: c["spec"].update(num_classes=10**12), "parameters, more than"),
    ("unknown arch", lambda c: c["spec"].update(arch="vgg"), "unknown model arch 'vgg'"),
    ("spec a list", lambda c: c.update(spec=[1, 2]), "a model spec must be a dict"),
    ("no spec", lambda c: c.pop("spec"), "has no spec"),
    ("no state_dict", lambda c: c.pop("state_dict"), "has no state_dict"),
])
def test_a_checkpoint_whose_spec_lies_is_a_checkpoint_error(probe, edit, needle, tmp_path):
    path = _ckpt(tmp_path, edit)
    with pytest.raises(CheckpointError) as e:  # expect_classes: the stages pass it, and it read the spec first
        checkpoint.load_checkpoint(path, expect_classes=10)
    assert str(path) in str(e.value) and needle in str(e.value), str(e.value)


# ---------------------------------------------------------------- a teacher of another architecture


@pytest.mark.parametrize("field,stored,wanted", [
    ("depth", model_spec("resnet", 14, 4, 1, 10), ModelParams("resnet", 8, 4)),
    ("width", model_spec("resnet", 8, 8, 1, 10), ModelParams("resnet", 8, 4)),
    ("arch", model_spec("resnet_bottleneck", 20, 4, 1, 10), ModelParams("resnet", 20, 4)),
    ("width", model_spec("resnet_bottleneck", 20, 8, 1, 10), ModelParams("resnet_bottleneck", 20, 4)),
])
def test_a_teacher_of_other_model_params_is_refused(field, stored, wanted, tmp_path):
    checkpoint.save_checkpoint(tmp_path / "teacher.pt", build_model(stored))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_checkpoint(tmp_path / "teacher.pt", expect_model=wanted)
    msg = str(e.value)
    assert f"model.{field} is {getattr(wanted, field)!r}" in msg and f"the file has " in msg, msg
    assert f"was trained as {stored['arch']} depth {stored['depth']}" in msg and "dvc repro" in msg, msg
    same = ModelParams(stored["arch"], stored["depth"], stored["channels"].get("stem", stored["channels"]["stages"][0]))
    checkpoint.load_checkpoint(tmp_path / "teacher.pt", expect_model=same)


# ---------------------------------------------------------------- disk full


class _FullAfter:
    """A file whose writes fail with ENOSPC once ``limit`` bytes are written, as on a full disk."""

    def __init__(self, fh, limit):
        self.fh, self.limit, self.n = fh, limit, 0

    def write(self, b):
        if self.n + len(b) > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.n += len(b)
        return self.fh.write(b)

    def __getattr__(self, name):
        return getattr(self.fh, name)


@pytest.fixture
def full_disk(monkeypatch):
    """Every Path.write_bytes/write_text and every torch.save stops with ENOSPC after 100 bytes."""
    real_save, real_open = torch.save, pathlib.Path.open

    def write(self, data, *args, **kwargs):
        with real_open(self, "wb") as fh:
            _FullAfter(fh, 100).write(data.encode() if isinstance(data, str) else data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write)
    monkeypatch.setattr(pathlib.Path, "write_text", write)
    monkeypatch.setattr(torch, "save", lambda obj, fh, *a, **k: real_save(obj, _FullAfter(fh, 100), *a, **k))


@pytest.mark.parametrize("writer", ["write_text", "torch_save", "export_compact"])
def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_old_one(writer, tmp_path, request):
    path = tmp_path / "out" / f"x.{writer}"
    path.parent.mkdir()
    path.write_bytes(b"old content")
    model = build_model(resnet_spec(8, 4, 1, 10))
    write = {"write_text": lambda: io.write_text(path, "y" * 1000),
             "torch_save": lambda: io.torch_save(path, {"w": torch.zeros(1000)}),
             "export_compact": lambda: export_compact(model, path)}[writer]
    request.getfixturevalue("full_disk")
    with pytest.raises(OutputError) as e:  # before: RuntimeError "unexpected pos" (torch), bare OSError
        write()
    msg = str(e.value)
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC and "\n" not in msg, msg
    assert str(path) in msg and "No space left on device" in msg and "free some space" in msg, msg
    if writer == "write_text":
        assert "needs 1,000 bytes" in msg, msg
    if writer == "export_compact":
        assert "needs " in msg and " bytes" in msg, msg
    assert path.read_bytes() == b"old content"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


def test_a_stage_reports_a_full_disk_in_one_line(monkeypatch, capsys):
    assert {OutputError, ExportError} <= set(stage.USER_ERRORS)
    from kdprune.params import params_from_dict
    from tests.helpers import default_params

    monkeypatch.setattr(stage, "load_params", lambda: params_from_dict(default_params()))

    def main(params):
        raise OutputError(errno.ENOSPC, "models/teacher.pt: cannot write it: No space left on device")

    with pytest.raises(SystemExit) as e:
        stage.run(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: models/teacher.pt: cannot write it: No space left on device\n"


def run_validate(tmp_path, monkeypatch, params_text):
    """stages/validate.py's main() in ``tmp_path`` (in process: no torch needed, as in DVC)."""
    from stages import validate

    (tmp_path / "params.yaml").write_bytes(params_text.encode())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["stages/validate.py"])
    return validate.main()


def test_validate_on_a_full_disk_is_one_line_and_keeps_the_old_marker(tmp_path, monkeypatch, capsys):
    """Old: validate let the OutputError of data/params.valid out as a traceback."""
    from tests.helpers import committed_params_text

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "params.valid").write_text("old\n")

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(pathlib.Path, "write_text", full)
    assert run_validate(tmp_path, monkeypatch, committed_params_text()) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data/params.valid: cannot write it: No space left on device (needs 70 bytes, ")
    assert err.count("\n") == 1 and "free some space and rerun" in err, err
    assert (tmp_path / "data" / "params.valid").read_bytes() == b"old\n"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["params.valid"]  # no temp file left


@pytest.mark.parametrize("key, literal, shown", [
    ("seed", "1" * 5000, "<an integer 5,000 digits long>"),
    ("seed", "-" + "9" * 4301, "<an integer 4,301 digits long>"),
    ("teacher.epochs", "1_" * 4400 + "1", "<an integer 4,401 digits long>"),  # underscores are no digits
    ("prune.ratio", "1" * 5000, "<an integer 5,000 digits long>"),  # a float key
    ("seed", "1:" * 3000 + "1", "<an integer 6,001 digits long>"),  # YAML 1.1 base 60
])
def test_an_integer_python_cannot_read_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys, key, literal, shown):
    """Old: a 5,000-digit seed raised ValueError "Exceeds the limit (4300 digits)" inside YAML parsing."""
    import yaml

    raw = default_params()
    section, _, leaf = key.rpartition(".")
    (raw[section] if section else raw)[leaf] = "HUGE_LITERAL"
    text = yaml.safe_dump(raw, sort_keys=False).replace("HUGE_LITERAL", literal)
    with pytest.raises(ParamsError) as e:
        params_from_dict(safe_load_yaml(text))
    assert str(e.value) == (f"params.yaml: {key} = {shown} is invalid: an integer has at most 4,300 digits here "
                            "(Python's limit for reading one), and every key allows far fewer")
    assert run_validate(tmp_path, monkeypatch, text) == 2  # the stage: one line, exit 2, no marker
    assert capsys.readouterr().err == f"error: {e.value}\n" and not (tmp_path / "data" / "params.valid").exists()


def test_a_huge_hex_integer_is_shown_bounded():
    """0x... is read without Python's digit limit, but repr() of it raises past 4,300 digits."""
    raw = {**default_params(), "seed": int("f" * 5000, 16)}
    with pytest.raises(ParamsError, match=r"^params.yaml: seed = <an integer 20,000 bits long> is invalid: must be an "
                                          r"integer in \[0, 4294967295\]"):
        params_from_dict(raw)
    assert show(10 ** 4299) == repr(10 ** 4299)[:18] + "..." + repr(10 ** 4299)[-19:]  # readable ones as before


# ---------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_mode_open_would_give(umask, tmp_path):
    old = os.umask(umask)
    try:
        io.write_text(tmp_path / "a.json", "{}\n")
        io.torch_save(tmp_path / "b.pt", {"w": torch.zeros(3)})
        export_compact(build_model(resnet_spec(8, 4, 1, 10)), tmp_path / "export" / "c.kdc")
        with io.atomic_path(tmp_path / "d.onnx") as tmp:  # what export_onnx and savefig write through
            tmp.write_bytes(b"x")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == want
    for name in ("a.json", "b.pt", "export/c.kdc", "d.onnx"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name


# ---------------------------------------------------------------- NaN in numeric checks


@pytest.mark.skipif(not export.onnx_available(), reason="onnxruntime not installed")
def test_onnx_parity_is_relative_to_large_logits_and_still_catches_a_wrong_export(tmp_path, monkeypatch):
    """A student at 54x with prune.min_layer_density gave logits of 3.5e6 on the check's random inputs, and
    onnxruntime differed from torch by 1.0 (relative 3e-7): the absolute 1e-3 failed a correct export."""
    from kdprune.deploy import ship

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = build_model(resnet_spec(8, 4, 1, 10)).eval()
    with torch.no_grad():
        model.fc.weight.mul_(1e7)  # logits around 1e6-1e7, as that student's
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    export.export_onnx(model, tmp_path / "big.onnx", (1, 28, 28))
    diff, scale = export.onnx_parity(model, tmp_path / "big.onnx", x)
    assert scale > 1e5 and 0 <= diff <= 1e-3 * scale
    got = ship.export_checked(model, tmp_path / "kd.onnx", (1, 28, 28), seed=0)  # passes: relative to the logits
    assert got == pytest.approx(diff, rel=0.5, abs=1e-3 * scale)
    # a wrong export still fails: another model's ONNX file in its place
    other = build_model(resnet_spec(8, 4, 1, 10)).eval()
    with torch.no_grad():
        other.fc.weight.mul_(1e7)
    monkeypatch.setattr(ship, "export_onnx", lambda m, path, shape: export.export_onnx(other, path, shape))
    with pytest.raises(ExportError, match=r"differ from torch by .* x max\(1, largest \|torch logit\|"):
        ship.export_checked(model, tmp_path / "kd.onnx", (1, 28, 28), seed=0)
    # non-finite logits are never a pass
    with torch.no_grad():
        model.fc.bias.fill_(float("inf"))
    assert all(math.isnan(v) for v in export.onnx_parity(model, tmp_path / "big.onnx", x))


def test_a_nan_onnx_difference_fails_the_parity_check(tmp_path, monkeypatch):
    from kdprune.deploy import ship

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ship, "export_onnx", lambda model, path, shape: pathlib.Path(path).write_bytes(b"x"))
    monkeypatch.setattr(ship, "onnx_parity", lambda model, path, x: (float("nan"), float("nan")))
    with pytest.raises(ExportError, match="differ from torch by nan"):  # before: NaN > tol is False
        ship.export_checked(build_model(resnet_spec(8, 4, 1, 10)), tmp_path / "kd.onnx", (1, 28, 28), seed=0)
