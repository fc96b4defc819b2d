"""Stage evaluate: accuracy, sizes, compression, MACs, exports and latency of every model, in one place.

Each model's torch test accuracy is measured once, by the stage that produced it (full test split, fp32, no
augmentation); this stage collects those, measures sizes and MACs, checks that every student kept the pruned
model's mask (unstructured) or architecture (structured), and exports every student as a compact sparse file.
Then it ships the teacher and every student (kdprune/deploy/ship.py): ONNX with its preprocessing and classes in
the file's metadata, checked against torch; the INT8 file onnxruntime's quantizer makes of it (quantize.method
ptq or qat); the test accuracy of both files through onnxruntime (the fp32 file's must match torch's within
0.1 pt, or the stage fails); their bytes and gzip bytes. All under models/export/, the numbers in
metrics/evaluate.json (flat keys, deterministic), and plots/accuracy.png.
Latencies (torch's and onnxruntime's, batch 1 and 128) vary from run to run, so they go to logs/latency.json
and the deployment table to logs/deployment.md and .csv: not DVC outputs, not committed, so a fresh
``dvc repro`` leaves git clean; the track stage logs them to MLflow. Latency timed while other work keeps the
CPUs busy is flagged (``cpu_busy_fraction``) and a warning is printed.
"""
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from kdprune import io, stage  # noqa: E402
from kdprune.deploy import int8, ort, ship  # noqa: E402
from kdprune.deploy import table as deploy_table  # noqa: E402
from kdprune.export import compact_bound_bytes, export_compact, onnx_available  # noqa: E402
from kdprune.measure import BUSY_WARNING, cpu_busy_fraction, cpu_model, latency_ms, size_report  # noqa: E402
from kdprune.prune import PHYSICAL  # noqa: E402
from kdprune.prune.counts import dense_macs, nonzero_macs  # noqa: E402
from kdprune.archs import spec_name  # noqa: E402
from kdprune.models import spec_of  # noqa: E402
from kdprune.params import Params  # noqa: E402
from kdprune.train.runtime import setup_runtime, to_runtime  # noqa: E402

EXPORT = Path("models/export")
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


def export_compacts(name: str, model, dense_path, out: dict) -> None:
    """The compact sparse export of one student, with its sizes, in ``out``."""
    out[f"bytes_checkpoint_{name}"] = dense_path.stat().st_size
    out[f"bytes_compact_{name}"] = export_compact(model, EXPORT / f"{name}.kdc", meta={"variant": name})
    out[f"bytes_compact_bound_{name}"] = compact_bound_bytes(model)


def ship_all(params: Params, models: dict, accs: dict, shape: tuple, meta: dict, out: dict) -> list[str]:
    """fp32 ONNX (with metadata) and INT8 of the teacher and every student, measured through onnxruntime
    (kdprune/deploy/ship.py); their metrics go in ``out``. Returns the names shipped."""
    data = stage.load_data(params.data)
    method = params.quantize.method
    n_cal = min(params.quantize.calibration_images, len(data["train_y"]))
    if method != "none" and n_cal < params.quantize.calibration_images:
        stage.log(f"evaluate: quantize.calibration_images = {params.quantize.calibration_images} but the train split "
                  f"has {n_cal} images: calibrating on all of them")
    props = ship.preprocessing(meta, data)
    test = lambda: ship.torch_batches(stage.test_loader(params, data, "cpu"))  # noqa: E731
    calibration = (None if method == "none" else
                   lambda: ship.torch_batches(stage.train_eval_loader(params, data, "cpu", limit=n_cal)))
    names = ["teacher", *params.distill.variants]
    for name in names:
        label = "int8-qat" if method == "qat" and name != "teacher" else "int8-ptq"
        out.update(ship.ship(name, models[name], shape, EXPORT, props, accs[name], test, calibration, label,
                             params.seed, threads=torch.get_num_threads()))
        stage.log(f"evaluate: {name}: {out[f'acc_{name}_onnx']:.2f} % through onnxruntime (torch {accs[name]:.2f} %)"
                  + (f", INT8 {out[f'acc_{name}_int8']:.2f} %, {out[f'bytes_onnx_int8_{name}']:,} bytes "
                     f"(fp32 {out[f'bytes_onnx_{name}']:,})" if calibration else ""))
    return names


def ort_latencies(names: list[str], shape: tuple, repeats: int, int8_too: bool) -> dict:
    """onnxruntime latency of every shipped file at batch 1 and 128 (``ort_latency_b<k>_ms_<name>[_int8]``) and
    each INT8 file's speed-up against the fp32 teacher's (``ort_speedup_b<k>_<name>_int8``)."""
    threads = torch.get_num_threads()
    sessions = {n: ort.session(EXPORT / f"{n}.onnx", threads) for n in names}
    if int8_too:
        sessions.update({f"{n}_int8": ort.session(int8.int8_path(EXPORT / f"{n}.onnx"), threads) for n in names})
    out: dict = {}
    for batch in (1, 128):
        ms = ort.latency_ms(sessions, shape, batch, repeats)
        out.update({f"ort_latency_b{batch}_ms_{k}": v for k, v in ms.items()})
        out.update({f"ort_speedup_b{batch}_{k}": ms["teacher"] / v for k, v in ms.items() if k != "teacher"})
    return out


def write_deployment_table(names: list[str], out: dict, latency: dict, params: Params) -> None:
    """logs/deployment.md and .csv (not DVC outputs: the latencies vary; the track stage logs them)."""
    table = deploy_table.rows(names, out, latency, structured=params.prune.method in PHYSICAL,
                              int8=params.quantize.method != "none")
    busy = latency.get("cpu_busy_fraction_before")
    context = (f"onnxruntime {ort.version()} on the CPU ({cpu_model()}), {torch.get_num_threads()} threads; latency: "
               f"median of {params.evaluate.latency_repeats} runs per model and batch, the models taking turns; "
               f"CPU busy with other work before timing: {'unknown' if busy is None else f'{busy:.0%}'}"
               + (" (BUSY: the latencies measure that contention)" if latency.get("busy") else "")
               + f"; quantize.method {params.quantize.method}")
    io.write_text(stage.LOGS / "deployment.md", deploy_table.to_markdown(table, context))
    io.write_text(stage.LOGS / "deployment.csv", deploy_table.to_csv(table))


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
        export_compacts(name, model, stage.student_path(name), out)
    shipped: list[str] = []
    if params.evaluate.onnx:
        if not onnx_available():
            raise stage.StageError("evaluate.onnx is true but onnx or onnxruntime is not installed: install "
                                   "requirements.txt, or set evaluate.onnx: false and quantize.method: none")
        shipped = ship_all(params, models, accs, shape, meta, out)
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
        if shipped:
            latency.update(ort_latencies(shipped, shape, params.evaluate.latency_repeats,
                                         int8_too=params.quantize.method != "none"))
    io.write_json(stage.METRICS / "evaluate.json", out)
    io.write_json(stage.LOGS / "latency.json", latency)
    if shipped:
        write_deployment_table(shipped, out, latency, params)
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
