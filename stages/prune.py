"""Stage prune: teacher -> models/pruned.pt, metrics/prune.json (accuracy before recovery).

  magnitude  global unstructured magnitude masks (the model keeps its shape; zeros + a mask)
  l1_filter  Li et al. structured filter pruning: channels are physically removed, the checkpoint
             stores the smaller architecture's spec
With ``prune.schedule: agp`` this stage still writes the one-shot pruned model at the target ratio:
it is the "no recovery" reference, and scratch variants take their mask from it.
"""
import torch

from kdprune import io, stage
from kdprune.measure import accuracy, dense_macs, nonzero_macs, size_report
from kdprune.models import build_model, spec_of
from kdprune.params import Params
from kdprune.pruning import apply_masks, check_finite, global_magnitude_masks, l1_filter_prune
from kdprune.train import setup_runtime, to_runtime


def main(params: Params) -> None:
    device = setup_runtime(params.runtime, params.seed, log=stage.log)
    data = stage.load_data(params)
    p = params.prune
    teacher, _, meta = io.load_checkpoint(stage.TEACHER, expect_classes=len(data["classes"]),
                                          expect_model=params.model)
    shape = tuple(meta["input_shape"])
    check_finite(teacher, str(stage.TEACHER))
    pruned = build_model(teacher.spec)
    pruned.load_state_dict(teacher.state_dict())
    masks = None
    if p.method == "magnitude":
        masks = global_magnitude_masks(pruned, p.ratio, p.include_first_conv, p.include_last_fc)
        apply_masks(pruned, masks)
    else:  # l1_filter: physical removal, then rebuild from the new spec so the checkpoint is self-describing
        l1_filter_prune(pruned, p.ratio, torch.zeros(1, *shape))
        shrunk = build_model(spec_of(pruned))
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
    io.write_json(stage.METRICS / "prune.json", {
        "acc_pruned": acc, **{k: report[k] for k in ratios},
        **{f"{k}_pruned": v for k, v in report.items() if k not in ratios}})
    stage.log(f"prune: {p.method} ratio {p.ratio}: acc {acc:.2f}% (no recovery), "
              f"compression {report['compression_ratio']:.2f}x, prunable {report['prunable_compression_ratio']:.2f}x, "
              f"MACs / {report['mac_reduction']:.2f}")


if __name__ == "__main__":
    stage.run(main, doc=__doc__)
