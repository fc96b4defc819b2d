"""Stage prepare: raw dataset -> data/prepared/dataset.pt (uint8 tensors + metadata)."""
from kdprune import io, stage
from kdprune.data import prepare_dataset
from kdprune.params import Params


def main(params: Params) -> None:
    d = params.data
    out = prepare_dataset(d.name, d.root, d.download, d.train_subset, d.test_subset, params.seed)
    io.torch_save(stage.PREPARED, out)
    stage.log(f"prepare: {d.name} train {tuple(out['train_x'].shape)} test {tuple(out['test_x'].shape)} "
              f"from {out['source']['train']} ({d.root or 'default search path'}) -> {stage.PREPARED}")


if __name__ == "__main__":
    stage.run(main)
