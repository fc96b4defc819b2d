"""Files a stranger hands kdprune (issue 27): a tall thin image, constant or 16-bit images, FIFOs and devices where
a file belongs, teacher weights that are NaN or not floating point, error messages about directories outside the
repository, duplicate YAML keys. Each test reproduces a probe that failed before the fix."""
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kdprune import checkpoint, io
from kdprune import data as kdata
from kdprune.data import DatasetError, imagefolder, locate_raw, read_idx, streaming, write_idx
from kdprune.data import decode
from kdprune.experiments.runs import FrontierError, read_records
from kdprune.models import build_model, resnet_spec
from kdprune.params import ParamsError, load_params
from kdprune.teacher import import_weights
from tests.helpers import committed_params_text, default_params

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def no_hang(seconds: int = 30):
    """Fail (instead of hanging CI) when the body blocks: a blocking open() or read() of a FIFO is interrupted."""
    def alarm(*_):
        raise AssertionError(f"blocked for {seconds} s (a FIFO was opened or read)")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def isolated(code: str, memory_gb: int = 3, timeout: int = 30) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python with its address space capped (an endless read dies of MemoryError there,
    not of the machine's memory) and a timeout."""
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({memory_gb << 30}, {memory_gb << 30}))\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def tiny_folder(root: Path, colour=lambda k: (40 * k, 100 + 20 * k, 200 - 30 * k), n=2) -> Path:
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (12, 10), colour(k)).save(root / split / c / f"{k}.png")
    return root


def prepare(root: Path, **kw) -> dict:
    return imagefolder.prepare(str(root), **{"image_size": 8, "num_workers": 0, "loader": "tensor", **kw})


# ---------------------------------------------------------------- 1. a tall, thin image

def test_a_tall_thin_image_is_refused_from_its_header_naming_file_size_and_aspect(tmp_path):
    """Old: a 2 KB PNG of 2,000,000 x 1 pixels took 3.6 GB at image_size 16 (the shorter side is resized to 16)."""
    png = tmp_path / "thin.png"
    Image.new("L", (100_000, 1)).save(png)
    assert png.stat().st_size < 2000
    for call in (lambda: decode.header(str(png)), lambda: decode.decode(str(png), 1, 16, 16)):
        with pytest.raises(DatasetError, match=r"thin\.png: 100000 x 1 pixels, an aspect ratio of 100,000\.0:1; "
                                               r"kdprune reads images of aspect ratio at most 20:1") as e:
            call()
        assert "\n" not in str(e.value)
    Image.new("L", (1, 21)).save(tmp_path / "tall.png")  # just past the bound, either way round
    with pytest.raises(DatasetError, match=r"tall\.png: 1 x 21 pixels, an aspect ratio of 21\.0:1"):
        decode.header(str(tmp_path / "tall.png"))
    Image.new("L", (20, 1)).save(tmp_path / "ok.png")  # at the bound: decoded as before
    assert decode.decode(str(tmp_path / "ok.png"), 1, 8, 8).shape == (1, 8, 8)


def test_a_tall_thin_image_costs_no_memory_and_stops_prepare_before_any_decoding(tmp_path):
    code = f"""
        import resource
        from kdprune.data import DatasetError, decode
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            decode.decode({str(tmp_path / 'thin.png')!r}, 3, 16, 16)
        except DatasetError as e:
            print("refused:", e)
        print("grew_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """
    Image.new("L", (500_000, 1)).save(tmp_path / "thin.png")  # before the fix: about 1 GB while resizing
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert "refused:" in r.stdout and "aspect ratio" in r.stdout, r.stdout + r.stderr
    assert int(r.stdout.split("grew_mb")[1]) < 100, r.stdout
    root = tiny_folder(tmp_path / "root")
    (tmp_path / "thin.png").rename(root / "train" / "b" / "thin.png")
    with pytest.raises(DatasetError, match=r"train/b/thin\.png: 500000 x 1 pixels, an aspect ratio of"):
        prepare(root)


# ---------------------------------------------------------------- 2. zero std, 16-bit images

@pytest.mark.parametrize("loader", ["tensor", "stream"])
def test_a_folder_of_constant_images_is_refused_naming_the_channel(tmp_path, loader):
    """Old: the computed std was 0 and prepare wrote it; normalising then divides by zero."""
    root = tiny_folder(tmp_path / "root", colour=lambda k: (40 * k, 100, 200))  # green and blue are constant
    with pytest.raises(DatasetError, match=r"data.root = .*root: channel 1 of .*train images has mean 0\.39\d* and "
                                           r"std 0\.0: every pixel has the same value, so normalising divides by "
                                           r"zero") as e:
        prepare(root, loader=loader)
    assert "\n" not in str(e.value)
    # the same images, their green channel varying: accepted
    tiny_folder(tmp_path / "ok", colour=lambda k: (40 * k, 100 + k, 200 + k))
    assert min(prepare(tmp_path / "ok", loader=loader)["std"]) > 0


def test_a_zero_std_is_refused_by_params_and_by_prepare_itself(tmp_path):
    root = tiny_folder(tmp_path / "root")
    for std in ([0.0, 0.2, 0.2], [float("nan")] * 3, [-0.1, 0.2, 0.2]):  # prepare's own check (old: accepted)
        with pytest.raises(ParamsError, match=r"data.std = .* every value must be a finite number above 0"):
            prepare(root, std=std)
    raw = default_params()
    raw["data"].update(name="imagefolder", root="x", std=[0])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"data.std = \[0.0\] is invalid: .* in \[0.001, 1\]"):
        load_params(tmp_path / "params.yaml")


SIXTEEN = np.array([[0, 255, 256, 1000, 32768, 65535, 40000, 511]] * 8, dtype=np.uint16)


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision.io, the reference
def test_16_bit_grayscale_is_scaled_by_its_high_byte_as_torchvision_io_does(tmp_path):
    """Old: PIL's convert("L") clipped every 16-bit value above 255 to 255 (a 16-bit image came out white)."""
    import torchvision.io as tio  # heavy optional: torchvision
    from torchvision.transforms.v2 import functional as F2  # heavy optional: torchvision

    png = tmp_path / "sixteen.png"
    Image.fromarray(SIXTEEN).save(png)
    assert Image.open(png).mode == "I;16"
    got = decode.decode(str(png), 1, 8, 8)
    want = F2.to_dtype(tio.decode_png(tio.read_file(str(png))), torch.uint8, scale=True)  # v >> 8
    assert torch.equal(got, want) and got[0, 0].tolist() == [0, 0, 1, 3, 128, 255, 156, 1]
    rgb = decode.decode(str(png), 3, 8, 8)  # a folder of mixed images converts to RGB: the same values
    assert torch.equal(rgb, want.expand(3, 8, 8))


def test_32_bit_pixels_beyond_8_bits_are_refused_and_within_them_kept(tmp_path):
    pgm = tmp_path / "deep.pgm"  # a 16-bit PGM: PIL opens it as mode I, and convert("L") clipped it
    pgm.write_bytes(b"P5 8 8 65535\n" + SIXTEEN.astype(">u2").tobytes())
    assert Image.open(pgm).mode == "I"
    with pytest.raises(DatasetError, match=r"deep\.pgm: PIL mode I pixels span 0\.\.65535; kdprune reads such 32-bit "
                                           r"images only when they lie in 0\.\.255"):
        decode.decode(str(pgm), 1, 8, 8)
    low = tmp_path / "low.pgm"
    low.write_bytes(b"P5 8 8 65535\n" + np.minimum(SIXTEEN, 255).astype(">u2").tobytes())
    assert decode.decode(str(low), 1, 8, 8)[0, 0].tolist() == [0, 255, 255, 255, 255, 255, 255, 255]


# ---------------------------------------------------------------- 3. FIFOs and devices where a file belongs

def test_a_fifo_as_teacher_checkpoint_is_refused_without_blocking(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teachers").mkdir()
    os.mkfifo(tmp_path / "teachers" / "pipe.pt")
    (tmp_path / "teachers" / "dir.pt").mkdir()
    t = SimpleNamespace(init="checkpoint", checkpoint="teachers/pipe.pt", epochs=0)
    with no_hang(), pytest.raises(io.CheckpointError, match=r"teachers/pipe\.pt: a FIFO \(named pipe\), not a regular "
                                                            r"file; a torch file must be a regular file"):
        import_weights(build_model(resnet_spec(8, 4, 1, 10)), t, None, (1, 8, 8))
    with pytest.raises(io.CheckpointError, match=r"teachers/dir\.pt: a directory, not a regular file"):
        checkpoint.state_dict_of("teachers/dir.pt")


def test_a_teacher_file_over_the_size_bound_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(build_model(resnet_spec(8, 4, 1, 10)).state_dict(), tmp_path / "t.pt")
    monkeypatch.setattr(checkpoint, "MAX_IMPORT_BYTES", 1000)
    with pytest.raises(io.CheckpointError, match=r"t\.pt: [\d,]+ bytes; a torch file is at most 1,000 bytes"):
        checkpoint.state_dict_of(tmp_path / "t.pt")


def test_a_fifo_or_a_device_as_records_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "runs.csv")
    with no_hang(), pytest.raises(FrontierError, match=r"runs\.csv: a FIFO \(named pipe\), not a regular file; a "
                                                       r"records CSV must be a regular file"):
        read_records(tmp_path / "runs.csv")
    r = isolated("""
        from pathlib import Path
        from kdprune.experiments.runs import FrontierError, read_records
        try:
            read_records(Path("/dev/zero"))
        except FrontierError as e:
            print("refused:", e)
    """)  # old: read /dev/zero until out of memory
    assert r.stdout.strip() == "refused: /dev/zero: a device, not a regular file; a records CSV must be a regular " \
                               "file", r.stdout + r.stderr[-2000:]


def test_report_with_a_fifo_as_records_exits_2_in_one_line(tmp_path):
    os.mkfifo(tmp_path / "runs.csv")
    r = subprocess.run([sys.executable, "-m", "kdprune", "report", "--records", str(tmp_path / "runs.csv")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'none.db'}"})
    assert r.returncode == 2, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]  # (after MLflow's own INFO lines)
    assert last.startswith("error: ") and last.endswith("runs.csv: a FIFO (named pipe), not a regular file; a records "
                                                         "CSV must be a regular file"), r.stderr
    assert "Traceback" not in r.stderr


def test_a_fifo_or_a_device_as_params_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "params.yaml")
    with no_hang(), pytest.raises(ParamsError, match=r"params\.yaml: a FIFO \(named pipe\), not a regular file"):
        load_params(tmp_path / "params.yaml")
    r = isolated("""
        from kdprune.params import ParamsError, load_params
        try:
            load_params("/dev/zero")
        except ParamsError as e:
            print("refused:", e)
    """)  # old: read /dev/zero until out of memory
    assert r.stdout.startswith("refused: /dev/zero: a device, not a regular file"), r.stdout + r.stderr[-2000:]


def test_an_image_replaced_by_a_fifo_after_prepare_is_one_line_not_a_hang(tmp_path, monkeypatch):
    """Training reads the decoded array; rebuilding a missing one reads the images again."""
    root = tiny_folder(tmp_path / "root")
    d = prepare(root, loader="stream")
    png = root / "val" / "b" / "1.png"
    png.unlink()
    os.mkfifo(png)
    monkeypatch.setenv("KDPRUNE_DECODED_DIR", str(tmp_path / "empty"))  # the array is missing: rebuilt
    with no_hang(), pytest.raises(DatasetError, match=r"val/b/1\.png: a FIFO \(named pipe\), not a regular file; the "
                                                      r"image must be a regular file") as e:
        streaming.split_array(d, "test", num_workers=0)
    assert "\n" not in str(e.value)


def test_data_files_that_are_fifos_are_refused(tmp_path):
    os.mkfifo(tmp_path / "train-images-idx3-ubyte")
    with no_hang(), pytest.raises(DatasetError, match=r"train-images-idx3-ubyte: a FIFO \(named pipe\), not a regular "
                                                      r"file; an IDX file must be a regular file"):
        read_idx(tmp_path / "train-images-idx3-ubyte")
    write_idx(tmp_path / "ok-idx1-ubyte", np.arange(3, dtype=np.uint8))  # a regular file reads as before
    assert read_idx(tmp_path / "ok-idx1-ubyte").tolist() == [0, 1, 2]


# ---------------------------------------------------------------- 4. imported weights: NaN, dtypes

def _import(tmp_path, monkeypatch, state) -> tuple[torch.nn.Module, str]:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teachers").mkdir(exist_ok=True)
    torch.save(state, tmp_path / "teachers" / "t.pt")
    model = build_model(resnet_spec(8, 4, 1, 10))
    t = SimpleNamespace(init="checkpoint", checkpoint="teachers/t.pt", epochs=0)
    return model, import_weights(model, t, None, (1, 8, 8))


def _state():
    torch.manual_seed(0)
    return build_model(resnet_spec(8, 4, 1, 10)).state_dict()


def test_an_imported_teacher_with_nan_weights_is_blamed_on_the_file_not_on_training(tmp_path, monkeypatch):
    """Old: imported as it was; prune then said "its training diverged; retrain it with a smaller learning rate"."""
    state = _state()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(io.CheckpointError, match=r"teachers/t\.pt: the imported weights hold NaN or infinite values "
                                                 r"\(conv1\.weight: 1 of 36\); the file's weights are broken") as e:
        _import(tmp_path, monkeypatch, state)
    assert "learning rate" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.complex64])
def test_integer_bool_and_complex_weights_are_refused_naming_key_and_dtype(tmp_path, monkeypatch, dtype):
    """Old: cast to float without a word (an int8-quantised teacher scored 10 %)."""
    state = _state()
    state["fc.weight"] = (state["fc.weight"] * 100).to(dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(io.CheckpointError, match=rf"teachers/t\.pt: fc\.weight is {name}, but the model's fc\.weight "
                                                 rf"is float32: kdprune imports floating-point weights only"):
        _import(tmp_path, monkeypatch, state)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_weights_are_converted_and_said_so(tmp_path, monkeypatch, dtype):
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _state().items()}
    model, origin = _import(tmp_path, monkeypatch, state)
    n = sum(v.is_floating_point() for v in state.values())
    assert origin.startswith(f"imported teachers/t.pt ({n} {str(dtype).removeprefix('torch.')} tensors (")
    assert origin.endswith("converted to float32)")
    assert all(torch.equal(v, state[k].float()) for k, v in model.state_dict().items() if v.is_floating_point())
    state = _state()
    state["fc.bias"] = state["fc.bias"].double()
    state["fc.bias"][0] = 1e300  # finite in float64, infinite in float32
    with pytest.raises(io.CheckpointError, match=r"fc\.bias \(float64\) holds values beyond the range of float32"):
        _import(tmp_path, monkeypatch, state)


def test_float32_weights_import_as_before(tmp_path, monkeypatch):
    state = _state()
    model, origin = _import(tmp_path, monkeypatch, state)
    assert origin == "imported teachers/t.pt"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- 5. messages about directories outside the repo

def test_an_image_folder_outside_the_repository_is_not_listed(tmp_path, monkeypatch):
    """Old: data.root = a home directory without val/: the error listed its file names."""
    outside = tmp_path / "home"
    (outside / "train" / "a").mkdir(parents=True)
    (outside / "id_rsa").write_text("secret")
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    with pytest.raises(DatasetError) as e:
        prepare(outside)
    assert "id_rsa" not in str(e.value) and "its contents are not listed: it is outside the repository" in str(e.value)
    assert "missing val/" in str(e.value)
    (repo / "data").mkdir()  # inside the repository: listed, to help
    (outside / "train").rename(repo / "data" / "train")
    with pytest.raises(DatasetError, match=r"missing val/; .* it holds \['train'\]"):
        prepare(repo / "data")


def test_the_debian_directory_stays_named_as_where_kdprune_looked(tmp_path, monkeypatch):
    """The Debian package's directory is kdprune's own default (the install hint names its package), not a path a
    user gave: the not-found message keeps naming it, and data/raw relative to the repository."""
    monkeypatch.chdir(tmp_path)
    info = kdata.REGISTRY["fashion_mnist"]  # file names that the installed package (if any) does not hold
    monkeypatch.setitem(kdata.REGISTRY, "fashion_mnist",
                        dataclasses.replace(info, files={k: f"{v}-absent" for k, v in info.files.items()}))
    assert info.debian_dir == "/usr/share/datasets/fashion-mnist"
    with pytest.raises(DatasetError, match=r"Looked in: \['/usr/share/datasets/fashion-mnist', 'data/raw', 'no "
                                           r"download .*apt-get install -y dataset-fashion-mnist"):
        locate_raw("fashion_mnist", None, False)


# ---------------------------------------------------------------- 6. duplicate YAML keys

def test_duplicate_keys_in_params_are_refused_naming_the_key_and_both_lines(tmp_path):
    """Old: PyYAML kept the last one silently, while DVC refuses the file."""
    text = committed_params_text()
    lines = text.splitlines()
    first = lines.index("prune:") + 1
    (tmp_path / "params.yaml").write_text(text + "prune:\n  ratio: 0.5\n")
    with pytest.raises(ParamsError, match=rf"params\.yaml: not valid YAML: duplicate key 'prune' on lines {first} and "
                                          rf"{len(lines) + 1}: a key may appear once in a mapping") as e:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(e.value)
    ratio = next(i for i, line in enumerate(lines) if line.startswith("  ratio:") and i > first) + 1
    nested = text.replace("prune:\n", "prune:\n  ratio: 0.25\n", 1)
    (tmp_path / "params.yaml").write_text(nested)
    with pytest.raises(ParamsError, match=rf"duplicate key 'ratio' on lines {first + 1} and {ratio + 1}"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(text)  # the committed file, each key once: loads
    assert load_params(tmp_path / "params.yaml").prune.ratio == 0.8
