"""``python -m kdprune predict MODEL.onnx IMAGE...`` (kdprune.predict) and the metadata contract it reads
(kdprune.onnxmeta): the probabilities are onnxruntime's on kdprune.imaging's arrays, the top K in order, the
--json schema, every refusal one line naming the file or key with exit status 2, and no torch on the way."""
import io
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from PIL import Image

from kdprune import imaging, onnxmeta, predict
from kdprune.onnxmeta import METADATA_KEYS, MetadataError, metadata_props, parse_metadata
from tests.helpers import ROOT

pytestmark = [pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")]  # (export.py's)

CLASSES = ["cat", "dog", "ship", "frog", "car"]
META = dict(image_size=12, resize_size=14, interpolation="bilinear", channels=3, mean=[0.5, 0.4, 0.3],
            std=[0.2, 0.25, 0.3], classes=CLASSES, dataset="toy", variant="kd", quantization="none",
            version="0.1.0", commit="0123abc")


class Tiny(nn.Module):
    def __init__(self, channels=3, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)) * 4)


def export(path, channels=3, classes=5, props=None, batch_fixed=0):
    torch.manual_seed(0)
    model = Tiny(channels, classes).eval()
    x = torch.zeros(batch_fixed or 1, channels, 12, 12)
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["logits"], dynamic_axes=None if batch_fixed else {"x": {0: "batch"},
                                                                                       "logits": {0: "batch"}})
    if props is not None:
        set_props(path, path, props)
    return str(path)


def set_props(src, dst, props: dict):
    m = onnx.load(str(src))
    del m.metadata_props[:]
    onnx.helper.set_model_props(m, props)
    onnx.save(m, str(dst))
    return str(dst)


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    return export(tmp_path_factory.mktemp("m") / "bare.onnx")


@pytest.fixture(scope="module")
def model(bare, tmp_path_factory):
    return set_props(bare, tmp_path_factory.mktemp("m") / "tiny.onnx", metadata_props(**META))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(1)
    out = []
    for k, (w, h, mode, ext) in enumerate([(30, 20, "RGB", "png"), (14, 14, "RGB", "jpg"), (17, 40, "L", "png"),
                                           (25, 25, "RGBA", "png"), (50, 33, "RGB", "png")]):
        colour = np.array([(97 * k) % 256, 255 - 60 * k, (45 + 150 * k) % 256, 200], np.int64)  # one per image
        a = np.clip(colour + rng.integers(-30, 30, (h, w, 4)), 0, 255).astype(np.uint8)
        img = Image.fromarray(a[:, :, :{"RGB": 3, "L": 1, "RGBA": 4}[mode]].squeeze(), mode)
        img.save(d / f"{k}.{ext}")
        out.append(str(d / f"{k}.{ext}"))
    return out


def run(capsys, *argv):
    rc = predict.main([*argv])
    out, err = capsys.readouterr()
    return rc, out, err


def direct(model_path, paths):
    """A plain onnxruntime run on kdprune.imaging's arrays, normalised by hand."""
    meta = META
    x = np.stack([imaging.load(p, 3, meta["resize_size"], meta["image_size"], meta["interpolation"]) for p in paths])
    x = (x.astype(np.float32) / 255 - np.float32(meta["mean"]).reshape(1, 3, 1, 1)) / \
        np.float32(meta["std"]).reshape(1, 3, 1, 1)
    logits = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"]).run(["logits"], {"x": x})[0]
    e = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- results

@pytest.mark.parametrize("batch", [64, 2])
def test_probabilities_are_a_direct_onnxruntime_run_in_order(model, images, capsys, monkeypatch, batch):
    monkeypatch.setattr(predict, "MAX_BATCH", batch)  # 2: three runs, the last one short
    rc, out, err = run(capsys, model, *images, "--top-k", "5", "--json")
    assert rc == 0 and err == ""
    doc = json.loads(out)
    want = direct(model, images)
    assert [d["image"] for d in doc] == images
    for row, p in zip(doc, want):
        assert [set(t) for t in row["top"]] == [{"class", "index", "prob"}] * 5
        probs = [t["prob"] for t in row["top"]]
        assert probs == sorted(probs, reverse=True)
        assert [t["class"] for t in row["top"]] == [CLASSES[t["index"]] for t in row["top"]]
        assert sorted(t["index"] for t in row["top"]) == list(range(5))
        np.testing.assert_allclose([p[t["index"]] for t in row["top"]], probs, rtol=1e-6, atol=1e-9)
    assert len({tuple(t["index"] for t in r["top"]) for r in doc}) > 1, "every image ranked alike: a weak test"


def test_text_output_is_one_line_per_image_with_the_top_k(model, images, capsys):
    rc, out, _ = run(capsys, model, *images[:3], "--top-k", "2")
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 3
    want = direct(model, images[:3])
    for line, path, p in zip(lines, images, want):
        i, j = np.argsort(-p)[:2]
        assert line == f"{path}: {CLASSES[i]} ({p[i]:.3f}), {CLASSES[j]} ({p[j]:.3f})"
    rc, out, _ = run(capsys, model, images[0], "--top-k", "99")  # clipped to the 5 classes
    assert rc == 0 and out.count("(") == 5
    rc, out, _ = run(capsys, model, images[0])  # default 5
    assert rc == 0 and out.count("(") == 5


def test_a_fixed_batch_axis_is_run_padded(tmp_path, images, capsys, model):
    fixed = export(tmp_path / "fixed.onnx", props=metadata_props(**META), batch_fixed=3)  # 5 images: 3 + 2 (padded)
    rc, out, _ = run(capsys, fixed, *images, "--json")
    assert rc == 0
    want = direct(model, images)
    for row, p in zip(json.loads(out), want):
        np.testing.assert_allclose([t["prob"] for t in row["top"]], [p[t["index"]] for t in row["top"]], rtol=1e-5)


def test_image_paths_and_class_names_cannot_forge_lines(tmp_path, bare, images, capsys):
    names = ["a\nb.png", "\x1b[31mred.png"]
    for name in names:
        (tmp_path / name).write_bytes(open(images[0], "rb").read())
    classes = ["x\ny", "\x1b[2J", "c", "d", "e"]
    m = set_props(bare, tmp_path / "m.onnx", metadata_props(**{**META, "classes": classes}))
    rc, out, _ = run(capsys, m, *[str(tmp_path / n) for n in names])
    assert rc == 0 and len(out.splitlines()) == 2 and "\x1b" not in out
    assert out.startswith(f"{tmp_path}/a\\nb.png: ") and "\\x1b[31mred.png: " in out and "x\\ny (" in out
    rc, out, _ = run(capsys, m, *[str(tmp_path / n) for n in names], "--json")
    assert rc == 0 and "\x1b" not in out
    assert [d["image"] for d in json.loads(out)] == [str(tmp_path / n) for n in names]


# ---------------------------------------------------------------- refusals

def png_declaring(w: int, h: int) -> bytes:
    """A 1x1 PNG whose IHDR chunk (CRC fixed) declares w x h pixels."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def bad_image(case: str, d) -> tuple[str, str]:
    p = d / f"{case}.png"
    if case == "missing":
        return str(p), r"missing\.png: cannot read the image \(No such file or directory\)"
    if case == "text":
        p.write_text("hello")
        return str(p), r"text\.png: not a readable image"
    if case == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
        p.write_bytes(p.read_bytes()[:-3000])
        return str(p), r"truncated\.png: cannot decode the image .* corrupt or truncated"
    if case == "bomb":
        p.write_bytes(png_declaring(30_000, 30_000))
        return str(p), r"bomb\.png: its header declares more than 178,956,970 pixels"
    if case == "big":
        p.write_bytes(png_declaring(10_000, 10_000))
        return str(p), r"big\.png: its header declares 10000 x 10000 = 100,000,000 pixels"
    if case == "thin":
        Image.new("RGB", (100, 2)).save(p)
        return str(p), r"thin\.png: 100 x 2 pixels, an aspect ratio of 50\.0:1; kdprune reads images of aspect ratio"
    if case == "fifo":
        os.mkfifo(p)
        return str(p), r"fifo\.png: a FIFO \(named pipe\), not a regular file"
    raise AssertionError(case)


def one_line_exit_2(rc, out, err, pattern):
    assert rc == 2 and out == "", (rc, out, err)
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "bomb", "big", "thin", "fifo"])
def test_a_bad_image_is_one_line_naming_it_and_exit_2(model, images, tmp_path, capsys, case):
    path, pattern = bad_image(case, tmp_path)
    one_line_exit_2(*run(capsys, model, images[0], path), pattern)


def model_case(case: str, d, bare) -> tuple[str, str]:
    if case == "missing":
        return str(d / "nope.onnx"), r"nope\.onnx: no such file \(the ONNX model\)"
    if case == "not_onnx":
        (d / "t.onnx").write_text("definitely not protobuf")
        return str(d / "t.onnx"), r"t\.onnx: not an ONNX model onnxruntime can load"
    if case == "empty":
        (d / "e.onnx").write_bytes(b"")
        return str(d / "e.onnx"), r"e\.onnx: not an ONNX model onnxruntime can load"
    if case == "directory":
        return str(d), rf"{re.escape(str(d))}: a directory, not a regular file"
    if case == "no_metadata":
        return bare, r"bare\.onnx: no kdprune metadata"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "not_onnx", "empty", "directory", "no_metadata"])
def test_a_bad_model_file_is_one_line_naming_it_and_exit_2(bare, images, tmp_path, capsys, case):
    path, pattern = model_case(case, tmp_path, bare)
    one_line_exit_2(*run(capsys, path, images[0]), pattern)


GOOD = metadata_props(**META)
BAD_PROPS = {  # key -> (bad value, what the line says)
    "mean": [("[0.5, 0.4", "not valid JSON"), ("[0.5, 0.4]", "must be a JSON list of 3 numbers"),
             ('{"a": 1}', "must be a JSON list of 3"), ('[0.5, "x", 0.3]', "found 'x'"), ("[0.5, 2, 0.3]", "found 2"),
             ("[NaN, 0.4, 0.3]", "not valid JSON"), ("[true, 0.4, 0.3]", "found True")],
    "std": [("[0, 0.2, 0.2]", "found 0"), ("[Infinity, 0.2, 0.2]", "not valid JSON"), ("[1e999, 0.2, 0.2]", "inf"),
            ("[-0.1, 0.2, 0.2]", "found -0.1"), ("[0.2, 0.2]", "list of 3")],
    "channels": [("2", "must be 1 \\(grayscale\\) or 3"), ("4", "in \\[1, 3\\]"), ("three", "decimal integer")],
    "image_size": [("0", "in \\[1, 4096\\]"), ("4097", "in \\[1, 4096\\]"), ("12.0", "decimal integer"),
                   ("-3", "decimal integer"), ("1" * 400, "decimal integer"), ("１２", "decimal integer")],
    "resize_size": [("11", "in \\[12, 4096\\]"), ("5000", "in \\[12, 4096\\]")],
    "interpolation": [("nearest", "one of bilinear, bicubic")],
    "quantization": [("int4", "one of none, int8-ptq, int8-qat")],
    "classes": [("[]", "1 to 100,000 class names"), ('"cat"', "JSON list of 1 to 100,000"),
                ("[1, 2, 3, 4, 5]", "class 0 is int"), (json.dumps(["a"] * 4 + ["x" * 257]), "class 4 is str"),
                (json.dumps([f"c{i}" for i in range(100_001)]), "1 to 100,000 class names"),
                (json.dumps(["a", "b", "a", "c", "d"]), "'a' appears more than once"),
                (json.dumps(["a", "b", "c", "d"]), "lists 4 classes, but the model gives 5 logits per image")],
    "input_name": [("", "must name the graph's input"), ("image", "the graph's inputs are \\['x'\\]")],
    "output_name": [("probs", "the graph's outputs are \\['logits'\\]")],
    "dataset": [("d" * 1001, "longer than 1000 characters")],
}
CASES = [(k, v, why) for k, vs in BAD_PROPS.items() for v, why in vs]


@pytest.mark.parametrize("key,value,why", CASES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(CASES)])
def test_a_malformed_metadata_key_is_one_line_naming_model_and_key(bare, images, tmp_path, capsys, key, value, why):
    m = set_props(bare, tmp_path / "m.onnx", {**GOOD, key: value})
    rc, out, err = run(capsys, m, images[0])
    one_line_exit_2(rc, out, err, rf"m\.onnx: ")
    assert f"metadata_props[{key!r}]" in err and re.search(why, err), err


@pytest.mark.parametrize("key", METADATA_KEYS)
def test_a_missing_metadata_key_is_named(bare, images, tmp_path, capsys, key):
    m = set_props(bare, tmp_path / "m.onnx", {k: v for k, v in GOOD.items() if k != key})
    one_line_exit_2(*run(capsys, m, images[0]), rf"m\.onnx: metadata_props\['{key}'\] is missing")


def test_metadata_that_disagrees_with_the_graph_is_refused(tmp_path, images, capsys):
    gray = export(tmp_path / "gray.onnx", channels=1, props=metadata_props(**META))  # metadata says 3 channels
    one_line_exit_2(*run(capsys, gray, images[0]), r"gray\.onnx: the graph's input 'x' is tensor\(float\) of shape "
                                                   r"\['batch', 1, 12, 12\]; the metadata \(channels 3")


def test_bad_arguments_are_one_line_and_exit_2(model, images, capsys, monkeypatch):
    one_line_exit_2(*run(capsys, model, images[0], "--top-k", "0"), r"--top-k 0: must be at least 1")
    one_line_exit_2(*run(capsys, model, images[0], "--top-k", "-3"), r"--top-k -3: must be at least 1")
    monkeypatch.setattr(predict, "MAX_IMAGES", 2)
    one_line_exit_2(*run(capsys, model, *images[:3]), r"3 images: predict takes at most 2 a call")


def test_non_finite_logits_are_blamed_on_the_model(tmp_path, images, capsys):
    m = onnx.load(export(tmp_path / "nan.onnx"))
    for init in m.graph.initializer:
        if init.name.endswith("fc.bias") or "bias" in init.name:
            arr = onnx.numpy_helper.to_array(init).copy()
            arr[:] = np.nan
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(tmp_path / "nan.onnx"))
    set_props(tmp_path / "nan.onnx", tmp_path / "nan.onnx", GOOD)
    one_line_exit_2(*run(capsys, str(tmp_path / "nan.onnx"), images[0]), r"nan\.onnx: non-finite logits")


# ---------------------------------------------------------------- the contract

def test_metadata_props_is_deterministic_complete_and_round_trips():
    a, b = metadata_props(**META), metadata_props(**{**META, "mean": np.array(META["mean"]), "image_size": np.int64(12)})
    assert list(a) == list(METADATA_KEYS) and a == metadata_props(**META)
    assert all(isinstance(v, str) for v in a.values())
    assert a["classes"] == '["cat","dog","ship","frog","car"]' and a["mean"] == "[0.5,0.4,0.3]"
    assert a["input_name"] == "x" and a["output_name"] == "logits" and a["channels"] == "3"
    meta = parse_metadata(a)
    assert (meta.image_size, meta.resize_size, meta.channels, meta.classes, meta.std) == \
        (12, 14, 3, tuple(CLASSES), (0.2, 0.25, 0.3))
    assert "resize the shorter side to 14 (bilinear" in meta.preprocessing
    assert parse_metadata({**a, "someone_else": "{"}) == meta  # other keys are not kdprune's
    assert b == a  # numpy numbers give the same text


@pytest.mark.parametrize("change,key", [({"std": [0, 1, 1]}, "std"), ({"channels": 2}, "channels"),
                                        ({"resize_size": 8}, "resize_size"), ({"classes": [1]}, "classes"),
                                        ({"quantization": "fp8"}, "quantization")])
def test_metadata_props_refuses_what_predict_would(change, key):
    with pytest.raises(MetadataError, match=rf"metadata_props\['{key}'\]"):
        metadata_props(**{**META, **change})


def test_metadata_props_refuses_nan_before_it_is_written():
    with pytest.raises(MetadataError, match=r"metadata_props\['std'\]: \[nan, nan, nan\] holds a value that is not"):
        metadata_props(**{**META, "std": [float("nan")] * 3})


# ---------------------------------------------------------------- the command line, and no torch

NO_TORCH = """
import importlib.abc, json, sys
BLOCK = sys.argv[1] == "block"
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if BLOCK and name.partition(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
from kdprune.__main__ import main
rc = main(["predict", *sys.argv[2:], "--json"])
print(json.dumps({"rc": rc, "torch": sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "torchvision"))}))
"""


def test_predict_imports_no_torch_and_runs_without_it(model, images):
    """First as it is (torch installed: not imported); then with torch and torchvision made impossible to import
    (a machine without them), through the dispatcher both times."""
    outs = []
    for block in ("no", "block"):
        r = subprocess.run([sys.executable, "-c", NO_TORCH, block, model, *images[:2]], cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        *doc, last = r.stdout.strip().splitlines()
        assert json.loads(last) == {"rc": 0, "torch": []}, (block, last, r.stderr)
        outs.append(json.loads("\n".join(doc)))
    assert outs[0] == outs[1] and len(outs[0]) == 2


def test_python_m_kdprune_predict_help_and_a_run(model, images):
    env = dict(os.environ, PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true")
    r = subprocess.run([sys.executable, "-m", "kdprune", "predict", "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m kdprune predict")
    assert "--top-k" in r.stdout and "clipped" in r.stdout and "--json" in r.stdout
    r = subprocess.run([sys.executable, "-m", "kdprune", "--help"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert "predict" in r.stdout
    r = subprocess.run([sys.executable, "-m", "kdprune", "predict", model, images[0], str(ROOT / "nope.png")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "nope.png" in r.stderr
