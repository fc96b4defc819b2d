"""Stage prune: teacher -> models/pruned.pt, metrics/prune.json (accuracy before recovery).

kdprune.prune.prune does the pruning of ``prune.method`` (magnitude, l1_filter, channel: kdprune/prune/);
this stage measures the result against the teacher and writes it.
With ``prune.schedule: agp`` this stage still writes the one-shot pruned model at the target ratio:
it is the "no recovery" reference, and scratch variants take their mask from it.
"""
from kdprune import checkpoint, io, stage
from kdprune.measure import accuracy, size_report
from kdprune.params import Params
from kdprune.prune import prune
from kdprune.prune.counts import dense_macs, nonzero_macs, sparsest_layer
from kdprune.prune.masks import check_finite
from kdprune.train.runtime import setup_runtime, to_runtime

TAYLOR_BATCHES = 4  # training batches whose gradients rank the channels (prune.importance: taylor)


def main(params: Params) -> None:
    device = setup_runtime(params.runtime, params.seed, log=stage.log)
    data = stage.load_data(params.data)
    p = params.prune
    teacher, _, meta = stage.load_model(stage.TEACHER, params.model, expect_classes=len(data["classes"]))
    shape = tuple(meta["input_shape"])
    check_finite(teacher, str(stage.TEACHER))

    def batches():
        loader = stage.train_loader(params, data, params.distill, "cpu")
        return (b for b, _ in zip(loader, range(TAYLOR_BATCHES)))

    result = prune(teacher, p, shape, params.model.factory, batches)
    pruned, masks, extra = result.model, result.masks, result.metrics
    acc = accuracy(to_runtime(pruned.to(device), params.runtime), stage.test_loader(params, data, device))
    report = size_report(pruned, teacher, p.include_first_conv, p.include_last_fc)
    report["macs"] = dense_macs(pruned, shape)
    report["nonzero_macs"] = nonzero_macs(pruned, shape)
    report["mac_reduction"] = dense_macs(teacher, shape) / report["macs"]
    checkpoint.save_checkpoint(stage.PRUNED, pruned, masks=masks, meta={**meta, "prune": vars(p)})
    # metrics only, each in one file (kdprune/metrics.py): the model's counts are suffixed _pruned; the ratios,
    # sparsities and MAC reduction describe the pruned model against the teacher
    ratios = ("compression_ratio", "prunable_compression_ratio", "sparsity", "prunable_sparsity", "mac_reduction")
    # the sparsest prunable layer's kept fraction: 1/36864 at ratio 0.99 left ResNet-8 at chance (prune.min_layer_density)
    extra["min_layer_density_pruned"] = sparsest_layer(pruned, p.include_first_conv, p.include_last_fc)
    io.write_json(stage.METRICS / "prune.json", {
        "acc_pruned": acc, **{k: report[k] for k in ratios}, **extra,
        **{f"{k}_pruned": v for k, v in report.items() if k not in ratios}})
    # with a MAC target, prune.ratio is not used: show the channel ratio reached
    shown = (f"ratio {p.ratio}" if p.target_macs_reduction is None else
             f"ratio {extra['channel_ratio']:.4g} (reached for target_macs_reduction {p.target_macs_reduction:g})")
    stage.log(f"prune: {p.method} {shown}: acc {acc:.2f}% (no recovery), "
              f"compression {report['compression_ratio']:.2f}x, prunable {report['prunable_compression_ratio']:.2f}x, "
              f"MACs / {report['mac_reduction']:.2f}")


if __name__ == "__main__":
    stage.run(main, doc=__doc__)
