"""Stage distill: recover the pruned model with every variant of ``distill.variants``
-> models/students/<variant>.pt, metrics/distill/<variant>.json, plots/distill/<variant>.csv.

The variants (kd, finetune, scratch, scratch_kd) share epochs, schedule, data order and masks;
kdprune/train/recovery.py says where each one starts and which loss it uses. They run one after another in
this one stage, each from the same seed, so each gives exactly what it gave in a process of its own.
The stage's command names no variant: a param value never reaches the shell (dvc.yaml).

Besides test accuracy, each variant's accuracy on a fixed subset of the training split (at most
stage.TRAIN_EVAL images, evenly spaced, no augmentation) is written as ``train_acc_<variant>``: a number a
study may select settings on (for example KD's alpha and temperature) without looking at the test split.

Resume: each variant keeps its resume checkpoint (checkpoints/distill_<variant>.pt) until the whole
stage has finished, so a rerun after a kill skips the variants that had finished and resumes the one
that was running.

``quantize.method: qat``: every variant trains with fake quantization (kdprune/deploy/qat.py) in the scheme of
the INT8 file evaluate makes: kd is quantization-aware recovery by distillation from the fp32 teacher, finetune
the same without KD. ``acc_<variant>`` is then the test accuracy of the trained fp32 weights (what is exported
and quantized), ``acc_<variant>_fakequant`` that of the fake-quantized model at the end of training.
"""
import time

from kdprune import checkpoint, io, stage
from kdprune.deploy import qat
from kdprune.measure import accuracy
from kdprune.params import Params
from kdprune.prune.counts import count_params, count_prunable
from kdprune.train import distributed
from kdprune.train.loop import fit
from kdprune.train.recovery import agp_schedule, starting_point, train_settings
from kdprune.train.runtime import bf16_choice, seed_everything, setup_runtime


def recover(params: Params, variant: str, data: dict, device) -> None:
    """Train one variant and write its outputs (rank 0). Every variant seeds and loads its models in the same
    order, so it draws the same random numbers as in a process of its own."""
    seed_everything(params.seed)
    n_classes = len(data["classes"])
    pruned, pruned_masks, meta = stage.load_model(stage.PRUNED, params.model, expect_classes=n_classes)
    teacher = stage.load_model(stage.TEACHER, params.model, expect_classes=n_classes)[0]
    start = starting_point(variant, params, pruned, pruned_masks, teacher)
    student, masks = start.student.to(device), start.masks
    _, nz_before = count_prunable(pruned)
    loader = stage.train_loader(params, data, params.distill, device)
    # quantize.method qat: train through INT8 rounding (kdprune/deploy/qat.py); the checkpoint holds plain weights
    fake_quant = qat.attach(student) if params.quantize.method == "qat" else None
    t0 = time.perf_counter()
    cfg = train_settings(params.distill, variant)  # finetune at distill.finetune_lr when that is set
    history = fit(student, loader, stage.test_loader(params, data, device), cfg, runtime=params.runtime,
                  objective=start.objective(teacher, params.distill), masks=masks,
                  prune_schedule=agp_schedule(params.prune, cfg.epochs * len(loader)) if start.gradual else None,
                  name=variant, section="distill", log=stage.log, checkpoint=stage.resume_path(f"distill_{variant}"))
    test_acc = history[-1]["test_acc"]
    extra = {}
    if fake_quant is not None:  # acc_<variant>: the fp32 weights, as exported and checked against ONNX
        fake_quant.remove()
        extra[f"acc_{variant}_fakequant"] = test_acc
        test_acc = accuracy(student, stage.test_loader(params, data, device))
    _, nz_after = count_prunable(student)
    if masks and nz_after > nz_before:  # the loop's invariant; never ship a student whose mask leaked
        raise RuntimeError(f"{variant}: non-zero prunable weights grew from {nz_before} to {nz_after}; masks leaked")
    if count_params(student)[0] != count_params(pruned)[0]:  # structured: the student is the pruned architecture
        raise RuntimeError(f"{variant}: the student has {count_params(student)[0]} parameters but the pruned "
                           f"model {count_params(pruned)[0]}")
    if not distributed.is_main():  # DDP: rank 0 writes the outputs
        return
    checkpoint.save_checkpoint(stage.student_path(variant), student, masks=masks,
                               meta={**meta, "variant": variant, "alpha": start.alpha, "at_beta": start.at_beta,
                                     "gradual": start.gradual})
    # metrics only, each in one file (kdprune/metrics.py); alpha, at_beta, gradual: in the checkpoint's meta
    train_acc = round(accuracy(student, stage.train_eval_loader(params, data, device)), 2)
    io.write_json(stage.METRICS / "distill" / f"{variant}.json",
                  {f"acc_{variant}": test_acc, f"train_acc_{variant}": train_acc, **extra})
    columns = ("epoch", "lr", "train_loss", "train_acc", "test_acc") + (("prunable_sparsity",) if start.gradual else ())
    stage.write_curve(stage.PLOTS / "distill" / f"{variant}.csv", history, columns)
    stage.write_timing(f"distill_{variant}", history, wall_seconds=round(time.perf_counter() - t0, 3),
                       bf16=int(bf16_choice(params.runtime, device)[0]))  # what runtime.bf16 resolved to here


def main(params: Params) -> None:
    device = setup_runtime(params.runtime, params.seed, log=stage.log)
    data = stage.load_data(params.data)
    for variant in params.distill.variants:  # validated names (kdprune.params.VARIANTS) only
        recover(params, variant, data, device)
    if distributed.is_main():  # every output is written: the resume states can go
        for variant in params.distill.variants:
            stage.finished(f"distill_{variant}")


if __name__ == "__main__":
    stage.run(main, ddp=True, doc=__doc__)
