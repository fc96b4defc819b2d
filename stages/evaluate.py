"""Stage evaluate: test accuracy, sizes, compression ratios and MACs of every model.

Writes metrics/evaluate.json (flat keys, shown by `dvc metrics show` / `dvc exp show`) and
plots/accuracy.png.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kdprune import io, stage  # noqa: E402
from kdprune.measure import accuracy, dense_macs, nonzero_macs, size_report  # noqa: E402
from kdprune.params import Params  # noqa: E402
from kdprune.train import setup_runtime, to_runtime  # noqa: E402


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


def main(params: Params) -> None:
    setup_runtime(params.runtime, params.seed)
    data = stage.load_data(params)
    n_classes = len(data["classes"])
    test = stage.test_loader(params, data)
    shape = tuple(data["train_x"].shape[1:])
    p = params.prune
    teacher = io.load_checkpoint(stage.TEACHER, expect_classes=n_classes)[0]
    models = {"teacher": teacher, "pruned": io.load_checkpoint(stage.PRUNED, expect_classes=n_classes)[0]}
    for v in params.distill.variants:
        models[v] = io.load_checkpoint(stage.student_path(v), expect_classes=n_classes)[0]
    out: dict = {"prune_ratio": p.ratio, "prune_method": p.method}
    for name, model in models.items():
        out[f"acc_{name}"] = accuracy(to_runtime(model, params.runtime), test)
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
                  f"{params.data.name}, ResNet-{params.model.depth}, {p.method} ratio {p.ratio} "
                  f"({out['compression_ratio']:.1f}x)")
    stage.log("evaluate: " + ", ".join(f"{n} {out[f'acc_{n}']:.2f}%" for n in names)
              + f"; compression {out['compression_ratio']:.2f}x (prunable {out['prunable_compression_ratio']:.2f}x)")


if __name__ == "__main__":
    stage.run(main)
