"""Stage distill: recover the pruned model -> models/students/<variant>.pt.

The variants (``distill.variants``: kd, finetune, scratch, scratch_kd) share epochs, schedule, data
order and masks; kdprune/recovery.py says where each one starts and which loss it uses.
"""
import argparse
import time

from kdprune import distributed, io, stage
from kdprune.params import VARIANTS, Params
from kdprune.pruning import count_params, count_prunable
from kdprune.recovery import agp_schedule, starting_point
from kdprune.train import fit, setup_runtime


def main(params: Params, variant: str) -> None:
    if variant not in params.distill.variants:
        raise stage.StageError(f"variant '{variant}' is not listed in distill.variants {params.distill.variants}")
    device = setup_runtime(params.runtime, params.seed)
    data = stage.load_data(params)
    n_classes = len(data["classes"])
    pruned, pruned_masks, meta = io.load_checkpoint(stage.PRUNED, expect_classes=n_classes)
    teacher = io.load_checkpoint(stage.TEACHER, expect_classes=n_classes, expect_model=params.model)[0]
    start = starting_point(variant, params, pruned, pruned_masks, teacher)
    student, masks = start.student.to(device), start.masks
    uses_teacher = start.alpha > 0 or start.at_beta > 0
    _, nz_before = count_prunable(pruned)
    loader = stage.train_loader(params, data, params.distill, device)
    t0 = time.perf_counter()
    history = fit(student, loader, stage.test_loader(params, data, device),
                  params.distill, runtime=params.runtime, teacher=teacher if uses_teacher else None,
                  alpha=start.alpha, temperature=params.distill.temperature, masks=masks, name=variant,
                  log=stage.log, checkpoint=stage.resume_path(f"distill_{variant}"), at_beta=start.at_beta,
                  prune_schedule=agp_schedule(params, params.distill.epochs * len(loader)) if start.gradual else None)
    _, nz_after = count_prunable(student)
    if masks and nz_after > nz_before:  # the loop's invariant; never ship a student whose mask leaked
        raise RuntimeError(f"{variant}: non-zero prunable weights grew from {nz_before} to {nz_after}; masks leaked")
    if count_params(student)[0] != count_params(pruned)[0]:  # structured: the student is the pruned architecture
        raise RuntimeError(f"{variant}: the student has {count_params(student)[0]} parameters but the pruned "
                           f"model {count_params(pruned)[0]}")
    if not distributed.is_main():  # DDP: rank 0 writes the outputs
        return
    io.save_checkpoint(stage.student_path(variant), student, masks=masks,
                       meta={**meta, "variant": variant, "alpha": start.alpha, "at_beta": start.at_beta,
                             "gradual": start.gradual})
    io.write_json(stage.METRICS / "distill" / f"{variant}.json", {
        f"acc_{variant}": history[-1]["test_acc"], "alpha": start.alpha, "at_beta": start.at_beta,
        "gradual": start.gradual, "nonzero_params": count_params(student)[1], "epochs": params.distill.epochs})
    columns = ("epoch", "lr", "train_loss", "train_acc", "test_acc") + (("prunable_sparsity",) if start.gradual else ())
    stage.write_curve(stage.PLOTS / "distill" / f"{variant}.csv", history, columns)
    stage.write_timing(f"distill_{variant}", history, wall_seconds=round(time.perf_counter() - t0, 3))
    stage.finished(f"distill_{variant}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", required=True, choices=VARIANTS)
    args = ap.parse_args()
    stage.run(lambda params: main(params, args.variant), ddp=True)
