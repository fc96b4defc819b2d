"""Stage distill: recover the pruned model -> models/students/<variant>.pt.

Variants (``distill.variants``) share epochs, schedule, data order and masks:
  kd        alpha = distill.alpha, soft targets from the *unpruned* teacher
  finetune  alpha = 0 (plain cross-entropy)
"""
import argparse
import time

from kdprune import distributed, io, stage
from kdprune.params import VARIANTS, Params
from kdprune.pruning import count_params, count_prunable
from kdprune.train import fit, setup_runtime


def variant_alpha(variant: str, params: Params) -> float:
    return {"kd": params.distill.alpha, "finetune": 0.0}[variant]


def main(params: Params, variant: str) -> None:
    if variant not in params.distill.variants:
        raise stage.StageError(f"variant '{variant}' is not listed in distill.variants {params.distill.variants}")
    device = setup_runtime(params.runtime, params.seed)
    data = stage.load_data(params)
    n_classes = len(data["classes"])
    student, masks, meta = io.load_checkpoint(stage.PRUNED, expect_classes=n_classes)
    student = student.to(device)
    alpha = variant_alpha(variant, params)
    teacher = io.load_checkpoint(stage.TEACHER, expect_classes=n_classes)[0] if alpha > 0 else None
    _, nz_before = count_prunable(student)
    t0 = time.perf_counter()
    history = fit(student, stage.train_loader(params, data, params.distill, device),
                  stage.test_loader(params, data, device),
                  params.distill, runtime=params.runtime, teacher=teacher, alpha=alpha,
                  temperature=params.distill.temperature, masks=masks, name=variant, log=stage.log,
                  checkpoint=stage.resume_path(f"distill_{variant}"))
    _, nz_after = count_prunable(student)
    if nz_after > nz_before:  # the loop's invariant; never ship a student whose mask leaked
        raise RuntimeError(f"{variant}: non-zero prunable weights grew from {nz_before} to {nz_after}; masks leaked")
    if not distributed.is_main():  # DDP: rank 0 writes the outputs
        return
    io.save_checkpoint(stage.student_path(variant), student, masks=masks,
                       meta={**meta, "variant": variant, "alpha": alpha})
    io.write_json(stage.METRICS / "distill" / f"{variant}.json", {
        f"acc_{variant}": history[-1]["test_acc"], "alpha": alpha, "nonzero_params": count_params(student)[1],
        "epochs": params.distill.epochs})
    stage.write_curve(stage.PLOTS / "distill" / f"{variant}.csv", history)
    stage.write_timing(f"distill_{variant}", history, wall_seconds=round(time.perf_counter() - t0, 3))
    stage.finished(f"distill_{variant}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", required=True, choices=VARIANTS)
    args = ap.parse_args()
    stage.run(lambda params: main(params, args.variant), ddp=True)
