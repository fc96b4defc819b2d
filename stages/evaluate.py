"""Stage evaluate: test accuracy, sizes, compression ratios and MACs of every model, in one place.

Each model's test accuracy is measured once, by the stage that produced it (full test split,
fp32, no augmentation); this stage collects those, measures sizes and MACs, checks that every
student kept the pruned model's mask, and writes metrics/evaluate.json (flat keys, shown by
`dvc metrics show` / `dvc exp show`) and plots/accuracy.png.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kdprune import io, stage  # noqa: E402
from kdprune.measure import dense_macs, nonzero_macs, size_report  # noqa: E402
from kdprune.params import Params  # noqa: E402
from kdprune.train import setup_runtime  # noqa: E402


def plot_accuracy(path, names: list[str], accs: list[float], title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    colors = ["#555555", "#c44e52"] + ["#4c72b0", "#55a868", "#8172b2", "#ccb974"][: len(names) - 2]
    bars = ax.bar(names, accs, color=colors)
    for b, a in zip(bars, accs):
        ax.text(b.get_x() + b.get_width() / 2, a, f"{a:.2f}", ha="center", va="bottom", fontsize=9)
    lo = max(0.0, min(accs) - 5.0)
    ax.set_ylim(lo, min(100.0, max(accs) + 2.0))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def measured_accuracies(variants: list[str]) -> dict[str, float]:
    """Test accuracy of each model, as measured once by the stage that produced it."""
    acc = {"teacher": io.read_json(stage.METRICS / "teacher.json")["acc_teacher"],
           "pruned": io.read_json(stage.METRICS / "prune.json")["acc_pruned"]}
    for v in variants:
        acc[v] = io.read_json(stage.METRICS / "distill" / f"{v}.json")[f"acc_{v}"]
    return acc


def main(params: Params) -> None:
    setup_runtime(params.runtime, params.seed)
    p = params.prune
    teacher, _, meta = io.load_checkpoint(stage.TEACHER)
    shape = tuple(meta["input_shape"])
    models = {"teacher": teacher, "pruned": io.load_checkpoint(stage.PRUNED)[0]}
    for v in params.distill.variants:
        models[v] = io.load_checkpoint(stage.student_path(v))[0]
    accs = measured_accuracies(params.distill.variants)
    out: dict = {"prune_ratio": p.ratio, "prune_method": p.method}
    for name, model in models.items():
        out[f"acc_{name}"] = accs[name]
        out[f"macs_{name}"] = dense_macs(model, shape)
        out[f"nonzero_macs_{name}"] = nonzero_macs(model, shape)
        rep = size_report(model, teacher, p.include_first_conv, p.include_last_fc)
        out[f"params_{name}"] = rep["params"]
        out[f"nonzero_params_{name}"] = rep["nonzero_params"]
        if name == "pruned":
            out["compression_ratio"] = rep["compression_ratio"]
            out["prunable_compression_ratio"] = rep["prunable_compression_ratio"]
            pruned_nz = rep["nonzero_prunable_params"]
        elif name != "teacher" and rep["nonzero_prunable_params"] != pruned_nz:  # students share the mask
            raise stage.StageError(f"{name}: {rep['nonzero_prunable_params']} non-zero prunable weights, but the "
                                   f"pruned model has {pruned_nz}; its mask did not persist")
    io.write_json(stage.METRICS / "evaluate.json", out)
    names = list(models)
    plot_accuracy(stage.PLOTS / "accuracy.png", names, [out[f"acc_{n}"] for n in names],
                  f"{meta['dataset']}, ResNet-{teacher.spec['depth']}, {p.method} ratio {p.ratio} "
                  f"({out['compression_ratio']:.1f}x)")
    stage.log("evaluate: " + ", ".join(f"{n} {out[f'acc_{n}']:.2f}%" for n in names)
              + f"; compression {out['compression_ratio']:.2f}x (prunable {out['prunable_compression_ratio']:.2f}x)")


if __name__ == "__main__":
    stage.run(main)
