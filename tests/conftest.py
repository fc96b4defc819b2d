"""Fixtures shared by every test; the helpers they use live in tests/helpers.py."""
import sys
from pathlib import Path

import pytest

from tests.helpers import write_fake_dataset  # first: it puts the repository root on sys.path
from kdprune import data as kdata  # noqa: E402


@pytest.fixture
def fake_root(tmp_path):
    return write_fake_dataset(tmp_path / "raw")


@pytest.fixture(autouse=True)
def no_dataset_downloads(monkeypatch):
    """No test reaches the network: torchvision's downloader is replaced by a failure, as when offline."""
    def offline(name, *args, **kwargs):
        raise ConnectionError(f"tests never download (asked for '{name}')")
    monkeypatch.setattr(kdata.registry, "_torchvision_download", offline)


@pytest.fixture(scope="session")
def venv_bin():
    return Path(sys.executable).parent


@pytest.fixture(autouse=True)
def decoded_arrays_in_tmp(tmp_path_factory, monkeypatch):
    """The stream path's decoded arrays (kdprune.data.decoded) go to a temp directory, never the repository's
    data/decoded/; a test that looks for them there sets its own KDPRUNE_DECODED_DIR or deletes it."""
    monkeypatch.setenv("KDPRUNE_DECODED_DIR", str(tmp_path_factory.getbasetemp() / "decoded"))
