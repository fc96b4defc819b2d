"""Stage train_teacher: the unpruned teacher -> models/teacher.pt, metrics/teacher.json.

``teacher.init`` says where its weights start (kdprune/teacher.py): scratch, an imported checkpoint in
teachers/, or torchvision's pretrained weights. ``teacher.epochs: 0`` only measures an imported teacher.
A teacher whose final test accuracy is near chance or far below its train accuracy gets a one-line
``warning:`` (kdprune.teacher.accuracy_warning); the stage still succeeds.
"""
import sys
import time

from kdprune import checkpoint, io, stage
from kdprune.train import distributed
from kdprune.measure import accuracy
from kdprune.prune.counts import dense_macs
from kdprune.archs import params_name
from kdprune.models import build_model, spec_from_params
from kdprune.params import Params
from kdprune.prune.counts import count_params
from kdprune.teacher import accuracy_warning, check_runs, import_weights, model_source
from kdprune.train.loop import fit
from kdprune.train.runtime import bf16_choice, setup_runtime, to_runtime


def main(params: Params) -> None:
    device = setup_runtime(params.runtime, params.seed, log=stage.log)
    data = stage.load_data(params.data)
    shape = tuple(data["train_x"].shape[1:])
    spec = spec_from_params(params.model, shape[0], len(data["classes"]))
    model = build_model(spec, params.model.factory)
    check_runs(model, shape, params_name(params.model), len(data["classes"]), model_source(params.model))
    origin = import_weights(model, params.teacher, params.model.name, shape)
    model = model.to(device)
    stage.log(f"teacher: {params_name(params.model)}, {origin}")
    t0 = time.perf_counter()
    if params.teacher.epochs > 0:
        history = fit(model, stage.train_loader(params, data, params.teacher, device),
                      stage.test_loader(params, data, device), params.teacher, runtime=params.runtime, name="teacher",
                      log=stage.log, checkpoint=stage.resume_path("teacher"))
    else:  # the imported teacher as it is
        history = [{"epoch": 0, "test_acc": accuracy(to_runtime(model, params.runtime),
                                                     stage.test_loader(params, data, device))}]
        stage.log(f"teacher: teacher.epochs 0: measured only, test {history[0]['test_acc']:.2f}%")
    if not distributed.is_main():  # DDP: rank 0 writes the outputs
        return
    warning = accuracy_warning(history, len(data["classes"]))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    checkpoint.save_checkpoint(stage.TEACHER, model, meta=stage.data_meta(data))
    total, _ = count_params(model)
    io.write_json(stage.METRICS / "teacher.json", {
        "acc_teacher": history[-1]["test_acc"],
        "params_teacher": total,
        "macs_teacher": dense_macs(model, shape),
    })  # metrics only, each in one file (kdprune/metrics.py): teacher.epochs is a param
    stage.write_curve(stage.PLOTS / "teacher.csv", history)
    trained = params.teacher.epochs > 0  # bf16: what runtime.bf16 (auto: the hardware's) resolved to here
    stage.write_timing("teacher", history if trained else None, wall_seconds=round(time.perf_counter() - t0, 3),
                       **({"bf16": int(bf16_choice(params.runtime, device)[0])} if trained else {}))
    stage.finished("teacher")


if __name__ == "__main__":
    stage.run(main, ddp=True, doc=__doc__)
