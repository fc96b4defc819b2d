"""Stage prepare: raw dataset -> data/prepared/dataset.pt (uint8 tensors + metadata)."""
from kdprune import io, stage
from kdprune.data import REGISTRY, prepare_dataset
from kdprune.params import Params


def main(params: Params) -> None:
    d = params.data
    out = prepare_dataset(d.name, d.root, d.download, d.train_subset, d.test_subset, params.seed,
                          svhn_extra=d.svhn_extra)
    io.torch_save(stage.PREPARED, out)
    info = REGISTRY[d.name]
    stage.log(f"prepare: {d.name} train {tuple(out['train_x'].shape)} test {tuple(out['test_x'].shape)} "
              f"from {out['source']['train']} ({d.root or 'default search path'}) -> {stage.PREPARED}")
    # normalisation uses the prepared train split's stats; the published ones are a check on the files
    stage.log(f"prepare: train mean {[round(v, 4) for v in out['mean']]} std {[round(v, 4) for v in out['std']]} "
              f"(published for the full split: {list(info.mean)} {list(info.std)})")
    off = max(abs(a - b) for a, b in zip(out["mean"] + out["std"], info.mean + info.std))
    if d.train_subset == 0 and not d.svhn_extra and not off <= 0.02:  # NaN stats warn too
        stage.log(f"prepare: WARNING: these statistics are {off:.3f} away from the published ones for '{d.name}'; "
                  f"are the files in {out['source']['train']} really {d.name}? (MNIST and Fashion-MNIST share "
                  f"file names)")


if __name__ == "__main__":
    stage.run(main, doc=__doc__)
