"""`python -m kdprune predict` on real Fashion-MNIST test images written as PNG gives what the pipeline's own
evaluation gives: the same probabilities, from the files evaluate ships (fp32 and INT8)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdprune import predict
from kdprune.data import TensorLoader
from kdprune.data.idx import read_idx
from kdprune.deploy import ort, ship
from kdprune.models import build_model, resnet_spec

RAW = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = [0.2860], [0.3530]


@pytest.mark.skipif(not (RAW / "t10k-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_predict_on_pngs_agrees_with_the_pipelines_evaluation(tmp_path, capsys):
    images = read_idx(RAW / "t10k-images-idx3-ubyte.gz")[:40]
    labels = read_idx(RAW / "t10k-labels-idx1-ubyte.gz")[:40].astype(np.int64)
    torch.manual_seed(0)
    model = build_model(resnet_spec(8, 4, 1, 10)).eval()
    x, y = torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels)
    loader = lambda: TensorLoader(x, y, MEAN, STD, 16, train=False)  # noqa: E731 - the pipeline's eval batches
    with torch.no_grad():
        acc = 100.0 * sum(int((model(b).argmax(1) == t).sum()) for b, t in loader()) / len(y)
    props = {"image_size": 28, "resize_size": 28, "interpolation": "bilinear", "channels": 1, "mean": MEAN,
             "std": STD, "classes": CLASSES, "dataset": "fashion_mnist"}
    ship.ship("kd", model, (1, 28, 28), tmp_path, props, acc, test=lambda: ship.torch_batches(loader()),
              calibration=lambda: ship.torch_batches(loader()), label="int8-ptq", seed=0)
    pngs = []
    for i, img in enumerate(images):
        pngs.append(str(tmp_path / f"{i:02d}.png"))
        Image.fromarray(img, mode="L").save(pngs[-1])
    for name in ("kd.onnx", "kd.int8.onnx"):
        sess = ort.session(tmp_path / name)
        logits = np.concatenate([ort.run_logits(sess, b) for b, _ in ship.torch_batches(loader())])
        want = np.exp(logits - logits.max(1, keepdims=True))
        want /= want.sum(1, keepdims=True)
        assert predict.main([str(tmp_path / name), *pngs, "--json", "--top-k", "10"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert [r["image"] for r in got] == pngs
        probs = np.zeros_like(want)
        for i, r in enumerate(got):
            for t in r["top"]:
                probs[i, t["index"]] = t["prob"]
                assert t["class"] == CLASSES[t["index"]]
        np.testing.assert_allclose(probs, want, atol=1e-5)
        assert [r["top"][0]["index"] for r in got] == list(want.argmax(1))
