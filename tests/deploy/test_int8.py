"""INT8 through onnxruntime (kdprune/deploy): the PTQ path, accuracy measured on the files, the parity check
failing on a broken export, the metadata, the deployment table."""
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from kdprune import onnxmeta
from kdprune.deploy import int8, ort, ship, table
from kdprune.export import ExportError, export_onnx
from kdprune.models import build_model, resnet_spec
from kdprune.prune.masks import apply_masks, global_magnitude_masks

SHAPE = (1, 28, 28)
PROPS = {"image_size": 28, "resize_size": 28, "interpolation": "bilinear", "channels": 1, "mean": [0.29],
         "std": [0.35], "classes": [f"c{i}" for i in range(10)], "dataset": "fashion_mnist"}


def pruned_model(seed=0, ratio=0.8):
    torch.manual_seed(seed)
    model = build_model(resnet_spec(8, 8, 1, 10)).eval()
    masks = global_magnitude_masks(model, ratio)
    apply_masks(model, masks)
    with torch.no_grad():  # BatchNorm statistics away from the identity, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def batches(model, n=4, batch=50, seed=1):
    """Random inputs, labelled by the model itself: its torch accuracy on them is 100 %."""
    out = []
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(batch, *SHAPE, generator=g)
        with torch.no_grad():
            y = model(x).argmax(1)
        out.append((x.numpy(), y.numpy()))
    return out


def int8_weights(path):
    """The int8 weight initialisers of a QDQ file (4-D conv and 2-D gemm weights)."""
    model = onnx.load(str(path))
    return [numpy_helper.to_array(t) for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) in (2, 4)]


def test_ptq_writes_int8_files_that_keep_the_zeros_the_metadata_and_most_of_the_accuracy(tmp_path):
    model = pruned_model()
    test = batches(model)
    out = ship.ship("kd", model, SHAPE, tmp_path, PROPS, acc_torch=100.0, test=lambda: iter(test),
                    calibration=lambda: iter(batches(model, n=2, seed=7)), label="int8-ptq", seed=0)
    fp32, q = tmp_path / "kd.onnx", tmp_path / "kd.int8.onnx"
    assert q == int8.int8_path(fp32) and q.is_file()
    assert out["acc_kd_onnx"] == 100.0  # the same function as torch on the same inputs
    assert out["acc_kd_int8"] >= 80.0, out  # near-ties of a random model flip first; a broken quantizer gives ~10
    assert out["bytes_onnx_int8_kd"] < 0.6 * out["bytes_onnx_kd"]  # 0.52x at this width: the graph is a third of it
    assert out["bytes_onnx_int8_gzip_kd"] < out["bytes_onnx_gzip_kd"] < out["bytes_onnx_kd"]
    # the zeros survive: at least the pruned weights are exact int8 zeros (BatchNorm folding scales, never shifts)
    pruned_zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    weights = int8_weights(q)
    assert weights and sum(int((w == 0).sum()) for w in weights) >= pruned_zeros
    # the metadata: everything predict needs, the INT8 file labelled as such
    for path, label in ((fp32, "none"), (q, "int8-ptq")):
        props = ort.session(path).get_modelmeta().custom_metadata_map
        meta = onnxmeta.parse_metadata(props)
        assert props["quantization"] == label and props["variant"] == "kd"
        assert json.loads(props["classes"]) == PROPS["classes"] and meta.image_size == 28
        assert props["kdprune_commit"]  # a commit, or "unknown" outside git


def test_the_int8_weights_are_on_the_grid_that_qat_trains_on(tmp_path):
    """onnxruntime's per-channel symmetric weights are kdprune.deploy.qat's grid: q = round(w / (max|w| / 127))."""
    from kdprune.deploy.qat import WEIGHT_QMAX, fake_quant_weight

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 26 * 26, 10)).eval()
    export_onnx(model, tmp_path / "m.onnx", SHAPE)
    q = int8.quantize(tmp_path / "m.onnx", [np.random.default_rng(0).standard_normal((8, *SHAPE), dtype=np.float32)])
    conv_q = next(w for w in int8_weights(q) if w.ndim == 4)
    w = model[0].weight.detach()
    scale = w.abs().flatten(1).amax(1) / WEIGHT_QMAX
    ours = torch.round(fake_quant_weight(w) / scale[:, None, None, None]).to(torch.int8).numpy()
    assert np.array_equal(conv_q, ours)


def test_the_onnx_accuracy_must_match_torchs_or_the_stage_fails(tmp_path, monkeypatch):
    """A file that is not the measured model (here: another model's weights, the logit check skipped) is caught by
    the accuracy parity, so its accuracy never reaches the metrics."""
    model, other = pruned_model(0), pruned_model(5)
    test = batches(model)
    monkeypatch.setattr(ship, "export_checked", lambda m, path, shape, seed: export_onnx(other, path, shape) or 0.0)
    with pytest.raises(ExportError, match=r"kd\.onnx: its test accuracy through onnxruntime is .* more than 0\.1 pt"):
        ship.ship("kd", model, SHAPE, tmp_path, PROPS, acc_torch=100.0, test=lambda: iter(test), calibration=None,
                  label="int8-ptq", seed=0)
    for bad in (float("nan"), 99.85):
        with pytest.raises(ExportError):
            ship.check_accuracy(tmp_path / "x.onnx", bad, 100.0)
    ship.check_accuracy(tmp_path / "x.onnx", 99.95, 100.0)  # within 0.1 pt


def test_ort_accuracy_counts_non_finite_logits_as_wrong():
    class Sess:
        def get_inputs(self):
            return [type("I", (), {"name": "x"})()]

        def run(self, _, feed):
            out = np.zeros((len(feed["x"]), 3), np.float32)
            out[:, 1] = 1.0
            out[0, 1] = np.nan
            return [out]

    acc, n = ort.accuracy(Sess(), [(np.zeros((4, 1, 2, 2), np.float32), np.ones(4, np.int64))])
    assert (acc, n) == (75.0, 4)


def test_quantize_without_metadata_or_with_a_bad_graph_is_one_line(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(Exception):
        int8.quantize(tmp_path / "bad.onnx", [])


def test_the_deployment_table_labels_unstructured_students_size_only():
    metrics = {"acc_teacher_onnx": 92.0, "acc_teacher_int8": 91.9, "acc_kd_onnx": 91.0, "acc_kd_int8": 90.8,
               "bytes_onnx_teacher": 300_000, "bytes_onnx_int8_teacher": 90_000, "bytes_onnx_kd": 300_000,
               "bytes_onnx_int8_kd": 90_000, "bytes_onnx_gzip_teacher": 280_000, "bytes_onnx_int8_gzip_teacher": 80_000,
               "bytes_onnx_gzip_kd": 100_000, "bytes_onnx_int8_gzip_kd": 30_000}
    latency = {"ort_latency_b1_ms_teacher": 1.0, "ort_latency_b1_ms_kd": 1.0, "ort_latency_b1_ms_kd_int8": 0.5,
               "ort_latency_b1_ms_teacher_int8": 0.5}
    rows = table.rows(["teacher", "kd"], metrics, latency, structured=False, int8=True)
    assert [(r["model"], r["format"], r["note"]) for r in rows] == [
        ("teacher", "fp32", "reference"), ("teacher", "int8", ""), ("kd", "fp32", "size only"), ("kd", "int8", "size only")]
    assert rows[3]["speedup_b1"] == 2.0 and rows[3]["latency_b128_ms"] is None
    assert table.rows(["teacher", "kd"], metrics, latency, structured=True, int8=True)[2]["note"] == ""
    md = table.to_markdown(rows, "context line")
    assert md.startswith("context line\n") and "| kd | int8 | 90.80 | 90,000 | 30,000 | 0.500 |  | 2.00x |  | size only |" in md
    assert table.to_csv(rows).splitlines()[0] == ",".join(table.COLUMNS)
