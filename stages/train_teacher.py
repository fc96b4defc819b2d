"""Stage train_teacher: train the unpruned teacher -> models/teacher.pt, metrics/teacher.json."""
import time

from kdprune import distributed, io, stage
from kdprune.measure import dense_macs
from kdprune.models import build_model, spec_from_params
from kdprune.params import Params
from kdprune.pruning import count_params
from kdprune.train import fit, setup_runtime


def main(params: Params) -> None:
    device = setup_runtime(params.runtime, params.seed, log=stage.log)
    data = stage.load_data(params)
    spec = spec_from_params(params.model, data["train_x"].shape[1], len(data["classes"]))
    model = build_model(spec).to(device)
    t0 = time.perf_counter()
    history = fit(model, stage.train_loader(params, data, params.teacher, device),
                  stage.test_loader(params, data, device), params.teacher, runtime=params.runtime, name="teacher",
                  log=stage.log, checkpoint=stage.resume_path("teacher"))
    if not distributed.is_main():  # DDP: rank 0 writes the outputs
        return
    io.save_checkpoint(stage.TEACHER, model, meta=stage.data_meta(data))
    total, _ = count_params(model)
    io.write_json(stage.METRICS / "teacher.json", {
        "acc_teacher": history[-1]["test_acc"],
        "params_teacher": total,
        "macs_teacher": dense_macs(model, tuple(data["train_x"].shape[1:])),
    })  # metrics only, each in one file (kdprune/metrics.py): teacher.epochs is a param
    stage.write_curve(stage.PLOTS / "teacher.csv", history)
    stage.write_timing("teacher", history, wall_seconds=round(time.perf_counter() - t0, 3))
    stage.finished("teacher")


if __name__ == "__main__":
    stage.run(main, ddp=True, doc=__doc__)
