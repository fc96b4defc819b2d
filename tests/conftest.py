import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from kdprune.data import REGISTRY, write_idx  # noqa: E402


def make_fake_images(n: int, classes: int = 10, size: int = 28, seed: int = 0):
    """Learnable synthetic images: each class lights a different square, plus noise."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % classes).astype(np.uint8)
    rng.shuffle(y)
    x = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
    for i, c in enumerate(y):
        r, col = divmod(int(c), 4)
        x[i, 2 + 6 * r: 8 + 6 * r, 2 + 6 * col: 8 + 6 * col] = 220
    return x, y


def write_fake_dataset(root: Path, n_train: int = 400, n_test: int = 100, gz: bool = True) -> Path:
    """The four Fashion-MNIST IDX files, in the real on-disk format, under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    files = REGISTRY["fashion_mnist"].files
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = make_fake_images(n, seed=seed)
        write_idx(root / f"{files[split + '_images']}{ext}", x)
        write_idx(root / f"{files[split + '_labels']}{ext}", y)
    return root


@pytest.fixture
def fake_root(tmp_path):
    return write_fake_dataset(tmp_path / "raw")


@pytest.fixture(scope="session")
def venv_bin():
    return Path(sys.executable).parent
