"""Stage prune: teacher -> models/pruned.pt, metrics/prune.json (accuracy before recovery).

  magnitude  global unstructured magnitude masks (the model keeps its shape; zeros + a mask); any model
  l1_filter  Li et al. structured filter pruning of the zoo's residual blocks: channels are physically removed,
             the checkpoint stores the smaller architecture's spec
  channel    structured pruning of any architecture through Torch-Pruning's dependency graph
             (kdprune/structured.py): prune.ratio of every group's channels, or until the MACs fall by
             prune.target_macs_reduction; the spec stores the pruning history that rebuilds it
With ``prune.schedule: agp`` this stage still writes the one-shot pruned model at the target ratio:
it is the "no recovery" reference, and scratch variants take their mask from it.
"""
import torch

from kdprune import io, stage
from kdprune.measure import accuracy, dense_macs, nonzero_macs, size_report
from kdprune.models import build_model, record_pruning, spec_of
from kdprune.params import Params
from kdprune.pruning import apply_masks, check_finite, global_magnitude_masks, l1_filter_prune, sparsest_layer
from kdprune.structured import channel_prune
from kdprune.train import setup_runtime, to_runtime

TAYLOR_BATCHES = 4  # training batches whose gradients rank the channels (prune.importance: taylor)


def main(params: Params) -> None:
    device = setup_runtime(params.runtime, params.seed, log=stage.log)
    data = stage.load_data(params)
    p = params.prune
    teacher, _, meta = stage.load_model(stage.TEACHER, params, expect_classes=len(data["classes"]))
    shape = tuple(meta["input_shape"])
    check_finite(teacher, str(stage.TEACHER))
    pruned = build_model(spec_of(teacher), params.model.factory)
    pruned.load_state_dict(teacher.state_dict())
    masks, extra = None, {}
    if p.method == "magnitude":
        masks = global_magnitude_masks(pruned, p.ratio, p.include_first_conv, p.include_last_fc,
                                       p.min_layer_density)
        apply_masks(pruned, masks)
    elif p.method == "channel":
        def batches():
            loader = stage.train_loader(params, data, params.distill, "cpu")
            return (b for b, _ in zip(loader, range(TAYLOR_BATCHES)))

        result = channel_prune(pruned, torch.zeros(1, *shape), p.importance, p.ratio, p.target_macs_reduction,
                               batches=batches)
        record_pruning(pruned, result.history, shape)
        # metrics are numbers only: the target and the importance are params (prune.*)
        extra = {"channel_ratio": result.ratio, "reached_macs_reduction": result.mac_reduction}
    if p.method != "magnitude":  # physical removal: rebuild from the new spec, so the checkpoint is self-describing
        if p.method == "l1_filter":
            l1_filter_prune(pruned, p.ratio, torch.zeros(1, *shape))
        shrunk = build_model(spec_of(pruned), params.model.factory)
        shrunk.load_state_dict(pruned.state_dict())
        pruned = shrunk
    acc = accuracy(to_runtime(pruned.to(device), params.runtime), stage.test_loader(params, data, device))
    report = size_report(pruned, teacher, p.include_first_conv, p.include_last_fc)
    report["macs"] = dense_macs(pruned, shape)
    report["nonzero_macs"] = nonzero_macs(pruned, shape)
    report["mac_reduction"] = dense_macs(teacher, shape) / report["macs"]
    io.save_checkpoint(stage.PRUNED, pruned, masks=masks, meta={**meta, "prune": vars(p)})
    # metrics only, each in one file (kdprune/metrics.py): the model's counts are suffixed _pruned; the ratios,
    # sparsities and MAC reduction describe the pruned model against the teacher
    ratios = ("compression_ratio", "prunable_compression_ratio", "sparsity", "prunable_sparsity", "mac_reduction")
    # the sparsest prunable layer's kept fraction: 1/36864 at ratio 0.99 left ResNet-8 at chance (prune.min_layer_density)
    extra["min_layer_density_pruned"] = sparsest_layer(pruned, p.include_first_conv, p.include_last_fc)
    io.write_json(stage.METRICS / "prune.json", {
        "acc_pruned": acc, **{k: report[k] for k in ratios}, **extra,
        **{f"{k}_pruned": v for k, v in report.items() if k not in ratios}})
    stage.log(f"prune: {p.method} ratio {p.ratio}: acc {acc:.2f}% (no recovery), "
              f"compression {report['compression_ratio']:.2f}x, prunable {report['prunable_compression_ratio']:.2f}x, "
              f"MACs / {report['mac_reduction']:.2f}")


if __name__ == "__main__":
    stage.run(main, doc=__doc__)
