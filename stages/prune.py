"""Stage prune: teacher -> masks -> models/pruned.pt, metrics/prune.json (accuracy before recovery)."""
from kdprune import io, stage
from kdprune.measure import accuracy, size_report
from kdprune.models import build_model
from kdprune.params import Params
from kdprune.pruning import apply_masks, global_magnitude_masks
from kdprune.train import setup_runtime, to_runtime


def main(params: Params) -> None:
    device = setup_runtime(params.runtime, params.seed)
    data = stage.load_data(params)
    p = params.prune
    teacher, _, meta = io.load_checkpoint(stage.TEACHER, expect_classes=len(data["classes"]))
    pruned = build_model(teacher.spec)
    pruned.load_state_dict(teacher.state_dict())
    masks = global_magnitude_masks(pruned, p.ratio, p.include_first_conv, p.include_last_fc)
    apply_masks(pruned, masks)
    acc = accuracy(to_runtime(pruned.to(device), params.runtime), stage.test_loader(params, data, device))
    report = size_report(pruned, teacher, p.include_first_conv, p.include_last_fc)
    io.save_checkpoint(stage.PRUNED, pruned, masks=masks, meta={**meta, "prune": vars(p)})
    io.write_json(stage.METRICS / "prune.json", {"acc_pruned": acc, "ratio": p.ratio, "method": p.method, **report})
    stage.log(f"prune: {p.method} ratio {p.ratio}: acc {acc:.2f}% (no recovery), "
              f"compression {report['compression_ratio']:.2f}x, prunable {report['prunable_compression_ratio']:.2f}x")


if __name__ == "__main__":
    stage.run(main)
