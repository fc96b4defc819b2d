"""Stage evaluate: accuracy, sizes, compression, MACs, exports and latency of every model, in one place.

Each model's test accuracy is measured once, by the stage that produced it (full test split,
fp32, no augmentation); this stage collects those, measures sizes and MACs, checks that every
student kept the pruned model's mask (unstructured) or architecture (structured), exports every
student as a compact sparse file and as ONNX (checked against torch with onnxruntime) under
models/export/, and writes metrics/evaluate.json (flat keys, deterministic) and plots/accuracy.png.
CPU latencies vary from run to run, so they go to logs/latency.json: not a DVC output, not committed, so a
fresh ``dvc repro`` leaves git clean; the track stage logs them to MLflow. Latency timed while other work
keeps the CPUs busy is flagged (``cpu_busy_fraction``) and a warning is printed.
"""
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from kdprune import io, stage  # noqa: E402
from kdprune.export import (compact_bound_bytes, export_compact, export_onnx, onnx_available,  # noqa: E402
                            onnx_parity)
from kdprune.measure import BUSY_WARNING, cpu_busy_fraction, latency_ms, size_report
from kdprune.prune.counts import dense_macs, nonzero_macs
from kdprune.archs import spec_name  # noqa: E402
from kdprune.models import spec_of  # noqa: E402
from kdprune.params import Params  # noqa: E402
from kdprune.train.runtime import setup_runtime, to_runtime  # noqa: E402

EXPORT = Path("models/export")
ONNX_TOLERANCE = 1e-3  # max |onnxruntime - torch| on the logits, fp32 on CPU, per unit of max(1, max |logit|)
LATENCY_NOTE = ("CPU forward wall time, fp32, median of evaluate.latency_repeats runs after warm-up. Unstructured "
                "(magnitude) sparsity does not speed up dense kernels: only structured pruning (l1_filter, channel) can.")


ACC_YLIM = (0.0, 108.0)  # the same axis on every run (room above 100 % for the bars' labels)


def accuracy_figure(names: list[str], accs: list[float], title: str):
    """The bar chart of plots/accuracy.png: fixed y-axis (``ACC_YLIM``), so runs compare at a glance."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100, layout="constrained")
    colors = ["#555555", "#c44e52"] + ["#4c72b0", "#55a868", "#8172b2", "#ccb974"][: len(names) - 2]
    bars = ax.bar(names, accs, color=colors)
    for b, a in zip(bars, accs):
        ax.text(b.get_x() + b.get_width() / 2, a, f"{a:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(*ACC_YLIM)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    return fig


def plot_accuracy(path, names: list[str], accs: list[float], title: str) -> None:
    fig = accuracy_figure(names, accs, title)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def measured_accuracies(variants: list[str]) -> dict[str, float]:
    """Test accuracy of each model, as measured once by the stage that produced it."""
    acc = {"teacher": io.read_json(stage.METRICS / "teacher.json")["acc_teacher"],
           "pruned": io.read_json(stage.METRICS / "prune.json")["acc_pruned"]}
    for v in variants:
        acc[v] = io.read_json(stage.METRICS / "distill" / f"{v}.json")[f"acc_{v}"]
    bad = {k: v for k, v in acc.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
    if bad:
        raise stage.StageError(f"non-finite test accuracy {bad}: a diverged run is not a result; rerun `dvc repro`")
    return acc


def check_student(name: str, rep: dict, pruned: dict, masked: bool) -> None:
    """Students keep the pruned model's mask (same non-zero count) or, structured, its architecture."""
    key = "nonzero_prunable_params" if masked else "params"
    if rep[key] != pruned[key]:
        what = "its mask did not persist" if masked else "it is not the pruned architecture"
        raise stage.StageError(f"{name}: {rep[key]} {key.replace('_', ' ')}, but the pruned model has {pruned[key]}; {what}")


def export_student(name: str, model, shape: tuple, dense_path, out: dict, onnx: bool, seed: int) -> None:
    """Compact and ONNX exports of one student, with their sizes and the ONNX parity in ``out`` (``onnx``:
    evaluate.onnx; ``seed`` draws the parity check's inputs)."""
    out[f"bytes_checkpoint_{name}"] = dense_path.stat().st_size
    out[f"bytes_compact_{name}"] = export_compact(model, EXPORT / f"{name}.kdc", meta={"variant": name})
    out[f"bytes_compact_bound_{name}"] = compact_bound_bytes(model)
    if onnx and onnx_available():
        path = EXPORT / f"{name}.onnx"
        export_onnx(model, path, shape)
        x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(seed))
        diff, scale = onnx_parity(model, path, x)
        # relative to the logits' size once they pass 1 (fp32 rounding scales with them); NaN fails (max keeps 1.0)
        allowed = ONNX_TOLERANCE * max(1.0, scale)
        if not diff <= allowed:  # NaN (a broken export) fails too
            raise stage.StageError(f"{path}: onnxruntime logits differ from torch by {diff:.3g} > {allowed:.3g} "
                                   f"({ONNX_TOLERANCE} x max(1, largest |torch logit| {scale:.3g}))")
        out[f"onnx_max_abs_diff_{name}"] = diff
        out[f"bytes_onnx_{name}"] = path.stat().st_size


def main(params: Params) -> None:
    setup_runtime(params.runtime, params.seed, log=stage.log)
    p = params.prune
    teacher, _, meta = stage.load_model(stage.TEACHER, params.model)
    shape = tuple(meta["input_shape"])
    pruned_model, pruned_masks, _ = stage.load_model(stage.PRUNED, params.model)
    models = {"teacher": teacher, "pruned": pruned_model}
    for v in params.distill.variants:
        models[v] = stage.load_model(stage.student_path(v), params.model)[0]
    accs = measured_accuracies(params.distill.variants)
    pruned_metrics = io.read_json(stage.METRICS / "prune.json")
    # metrics only, each in one file (kdprune/metrics.py): the teacher's and the pruned model's are in
    # teacher.json and prune.json; this file holds what evaluate measures of each student
    out: dict = {}
    latency: dict = {"note": LATENCY_NOTE, "threads": torch.get_num_threads()}
    pruned_rep = size_report(pruned_model, teacher, p.include_first_conv, p.include_last_fc)
    for name in params.distill.variants:
        model = models[name]
        rep = size_report(model, teacher, p.include_first_conv, p.include_last_fc)
        check_student(name, rep, pruned_rep, masked=bool(pruned_masks))
        out[f"macs_{name}"] = dense_macs(model, shape)
        out[f"nonzero_macs_{name}"] = nonzero_macs(model, shape)
        out[f"params_{name}"] = rep["params"]
        out[f"nonzero_params_{name}"] = rep["nonzero_params"]
        out[f"nonzero_prunable_params_{name}"] = rep["nonzero_prunable_params"]
        export_student(name, model, shape, stage.student_path(name), out, params.evaluate.onnx, params.seed)
    if params.evaluate.latency_repeats:  # the pruned model has its students' shape: not timed again
        busy = cpu_busy_fraction()
        latency["cpu_busy_fraction_before"] = busy
        if busy is not None and busy > BUSY_WARNING:
            stage.log(f"evaluate: WARNING: other work keeps {busy:.0%} of the CPUs busy; the latency figures in "
                      f"{stage.LOGS / 'latency.json'} measure that contention, not the models. Re-measure on an "
                      "idle machine: `dvc repro -f evaluate`")
        latency["busy"] = busy is not None and busy > BUSY_WARNING
        timed = {n: to_runtime(m, params.runtime) for n, m in models.items() if n != "pruned"}
        for batch in (1, 128):
            ms = latency_ms(timed, shape, batch, params.evaluate.latency_repeats,
                            channels_last=params.runtime.channels_last)
            latency.update({f"latency_b{batch}_ms_{n}": v for n, v in ms.items()})
            latency.update({f"speedup_b{batch}_{v}": ms["teacher"] / ms[v] for v in params.distill.variants})
    io.write_json(stage.METRICS / "evaluate.json", out)
    io.write_json(stage.LOGS / "latency.json", latency)
    names = list(models)
    ratio = pruned_metrics["compression_ratio"]
    # one point per model for `dvc plots diff <exp> <exp> ...` (dvc.yaml: accuracy against compression)
    io.write_json(stage.PLOTS / "compression.json", [
        {"model": n, "compression_ratio": 1.0 if n == "teacher" else ratio, "accuracy": accs[n]} for n in names])
    plot_accuracy(stage.PLOTS / "accuracy.png", names, [accs[n] for n in names],
                  f"{meta['dataset']}, {spec_name(spec_of(teacher))}, {p.method} ratio {p.ratio} "
                  f"({ratio:.1f}x)")
    stage.log("evaluate: " + ", ".join(f"{n} {accs[n]:.2f}%" for n in names)
              + f"; compression {ratio:.2f}x (prunable {pruned_metrics['prunable_compression_ratio']:.2f}x), "
              f"MACs / {pruned_metrics['mac_reduction']:.2f}")


if __name__ == "__main__":
    stage.run(main, doc=__doc__)
