"""Stage prepare: raw dataset -> data/prepared/dataset.pt (uint8 tensors + metadata; for an image folder on the
stream path, the file index and the keys of its decoded arrays, written to data/decoded/: kdprune.data.decoded)."""
from kdprune import io, stage
from kdprune.data import REGISTRY, imagefolder, prepare_dataset
from kdprune.models.torchvision import weights_of
from kdprune.params import Params
from kdprune.data.preprocessing import folder_settings, override_stats


def main(params: Params) -> None:
    d = params.data
    if d.name == "imagefolder":
        return prepare_folder(params)
    out = prepare_dataset(d.name, d.root, d.download, d.train_subset, d.test_subset, params.seed,
                          svhn_extra=d.svhn_extra)
    computed = out["mean"], out["std"]
    out["mean"], out["std"] = override_stats(computed, d.mean, d.std, out["train_x"].shape[1])
    io.torch_save(stage.PREPARED, out)
    info = REGISTRY[d.name]
    stage.log(f"prepare: {d.name} train {tuple(out['train_x'].shape)} test {tuple(out['test_x'].shape)} "
              f"from {out['source']['train']} ({d.root or 'default search path'}) -> {stage.PREPARED}")
    # normalisation uses the prepared train split's stats; the published ones are a check on the files
    stage.log(f"prepare: train mean {[round(v, 4) for v in computed[0]]} std {[round(v, 4) for v in computed[1]]} "
              f"(published for the full split: {list(info.mean)} {list(info.std)})")
    if d.mean is not None or d.std is not None:
        stage.log(f"prepare: normalising with data.mean/data.std: {out['mean']} {out['std']}")
    off = max(abs(a - b) for a, b in zip(computed[0] + computed[1], info.mean + info.std))
    if d.train_subset == 0 and not d.svhn_extra and not off <= 0.02:  # NaN stats warn too
        stage.log(f"prepare: WARNING: these statistics are {off:.3f} away from the published ones for '{d.name}'; "
                  f"are the files in {out['source']['train']} really {d.name}? (MNIST and Fashion-MNIST share "
                  f"file names)")


def prepare_folder(params: Params) -> None:
    d = params.data
    # a pretrained teacher keeps its accuracy only on its own preprocessing: its weights' transforms are the
    # default (every data.* key that is set still wins)
    pretrained = params.teacher.init == "pretrained" and params.model.arch == "torchvision"
    weights = weights_of(params.model.name) if pretrained else None
    out = imagefolder.prepare(d.root, **folder_settings(d, weights), loader=d.loader, memory_budget_mb=d.memory_budget_mb,
                              train_subset=d.train_subset, test_subset=d.test_subset, seed=params.seed,
                              num_workers=d.num_workers,
                              log=lambda msg: stage.log(f"prepare: decoded array of {msg}"))
    io.torch_save(stage.PREPARED, out)
    p = out["preprocessing"]
    stage.log(f"prepare: imagefolder {d.root}: {len(out['classes'])} classes, train {tuple(out['train_x'].shape)} "
              f"val {tuple(out['test_x'].shape)} ({p['channels']} channel{'s' if p['channels'] > 1 else ''}; resize "
              f"{p['resize_size']} {p['interpolation']}, centre crop {p['image_size']}), {out['loader']} path "
              f"(data.loader = {d.loader}, budget {d.memory_budget_mb} MiB) -> {stage.PREPARED}")
    stage.log(f"prepare: normalising with mean {_r4(out['mean'])} std {_r4(out['std'])} (computed from train: "
              f"{_r4(out['computed_mean'])} {_r4(out['computed_std'])})")


def _r4(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


if __name__ == "__main__":
    stage.run(main, doc=__doc__)
