"""The dataset registry (``REGISTRY``: each built-in dataset's files, classes, sizes, statistics) and where
its raw files are found (``locate_raw``: ``data.root``, the Debian package directory, ``data/raw``, the downloader)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdprune.data.limits import DatasetError
from kdprune.io import resolves_inside


@dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline knows about one dataset.

    ``mean``/``std`` are the published per-channel statistics of the full train split, kept for
    reference and as a check on the files (the prepare stage logs them next to the computed ones).
    Normalisation does NOT use them: ``prepare_dataset`` stores the exact mean/std of the prepared
    train split (after ``train_subset``), computed from train only, never from test.
    """
    name: str
    classes: tuple[str, ...]  # canonical names; CIFAR takes its names from the meta file
    channels: int
    image_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # is a horizontal flip label-preserving? (not for digits)
    format: str  # "idx" | "cifar" | "svhn": which reader
    files: dict[str, str]  # role -> raw file name
    subdirs: tuple[str, ...]  # where the files may sit under a searched directory ("" = in it)
    torchvision_class: str  # torchvision.datasets class, for the downloader
    debian_package: str | None = None
    debian_dir: str | None = None
    optional: tuple[str, ...] = ()  # roles read only on request (svhn: extra)
    pickle_keys: tuple[str, str] | None = None  # cifar: (labels key in a batch, names key in meta)
    max_images: dict[str, int] | None = None  # role -> images in the published file: the most a file may declare


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_MAX_IMAGES = {"train_images": 60000, "train_labels": 60000, "test_images": 10000, "test_labels": 10000}
_DIGITS = tuple(str(i) for i in range(10))
_CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel
can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea
seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table
tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman
worm""".split())

REGISTRY: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        channels=1, image_size=(28, 28), mean=(0.2860,), std=(0.3530,),
        hflip=True,
        format="idx", files=_IDX_FILES, subdirs=("", "FashionMNIST/raw"), torchvision_class="FashionMNIST",
        max_images=_IDX_MAX_IMAGES,
        debian_package="dataset-fashion-mnist",
        debian_dir="/usr/share/datasets/fashion-mnist",
    ),
    "mnist": DatasetInfo(
        name="mnist", classes=_DIGITS,
        channels=1, image_size=(28, 28), mean=(0.1307,), std=(0.3081,),
        hflip=False,
        format="idx", files=_IDX_FILES, subdirs=("", "MNIST/raw"), torchvision_class="MNIST",
        max_images=_IDX_MAX_IMAGES,
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        channels=3, image_size=(32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        hflip=True,
        format="cifar",
        files={**{f"train_{i}": f"data_batch_{i}" for i in range(1, 6)}, "test": "test_batch",
               "meta": "batches.meta"},
        subdirs=("cifar-10-batches-py", ""), torchvision_class="CIFAR10",
        pickle_keys=("labels", "label_names"),
        max_images={**{f"train_{i}": 10000 for i in range(1, 6)}, "test": 10000},
    ),
    "cifar100": DatasetInfo(
        name="cifar100", classes=_CIFAR100_CLASSES,
        channels=3, image_size=(32, 32), mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        hflip=True,
        format="cifar", files={"train": "train", "test": "test", "meta": "meta"},
        subdirs=("cifar-100-python", ""), torchvision_class="CIFAR100",
        pickle_keys=("fine_labels", "fine_label_names"), max_images={"train": 50000, "test": 10000},
    ),
    "svhn": DatasetInfo(
        name="svhn", classes=_DIGITS,
        channels=3, image_size=(32, 32), mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
        hflip=False,
        format="svhn", files={"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"},
        subdirs=("",), torchvision_class="SVHN", optional=("extra",),
        max_images={"train": 73257, "test": 26032, "extra": 531131},
    ),
}

# Datasets read from a directory tree of image files rather than from REGISTRY's fixed files: kdprune/imagefolder.py
# (stages/prepare.py dispatches to it). REGISTRY + FOLDER_DATASETS = kdprune.params.DATASETS.
FOLDER_DATASETS = ("imagefolder",)


_FORMAT_WORDS = {"idx": "IDX", "cifar": "CIFAR python pickle", "svhn": "SVHN .mat"}


def _joined_names(files: dict[str, Path], roles: list[str]) -> str:
    """File names only (not paths): the same bytes read from another directory give the same output hash."""
    return "+".join(files[r].name for r in roles)


def _roles(info: DatasetInfo, extra: bool) -> list[str]:
    return [r for r in info.files if r not in info.optional or (extra and r == "extra")]


def _find(d: Path, info: DatasetInfo, roles: list[str]) -> tuple[dict[str, Path], Path]:
    """The files for ``roles`` in the first of ``info.subdirs`` under ``d`` that holds all of them; if none
    does, the most complete partial match (for the error message)."""
    best: tuple[dict[str, Path], Path] = ({}, d / info.subdirs[0])
    for sub in info.subdirs:
        base = d / sub if sub else d
        found = {}
        for role in roles:
            name = info.files[role]
            for cand in (base / name, base / f"{name}.gz") if info.format == "idx" else (base / name,):
                if cand.is_file():
                    found[role] = cand
                    break
        if len(found) == len(roles):
            return found, base
        if len(found) > len(best[0]):
            best = (found, base)
    return best


def _expected(info: DatasetInfo, roles: list[str]) -> str:
    gz = " (optionally .gz)" if info.format == "idx" else ""
    return f"the {_FORMAT_WORDS[info.format]} files {sorted(info.files[r] for r in roles)}{gz}"


def _where(info: DatasetInfo) -> str:
    return " or ".join("in it" if not s else f"in {s}/ under it" for s in info.subdirs)


def _partial(info: DatasetInfo, roles: list[str], found: dict[str, Path], base: Path) -> str:
    if not found:
        return ""
    return f" ({base} holds some of them but lacks {sorted(info.files[r] for r in roles if r not in found)})"


def locate_raw(name: str, root: str | None, download: bool, download_dir: Path = Path("data/raw"),
               svhn_extra: bool = False) -> dict[str, Path]:
    """Search order: ``data.root``, the Debian package's directory, ``download_dir``, then torchvision's
    downloader into ``download_dir``. Returns role -> file path."""
    info = REGISTRY[name]
    roles = _roles(info, svhn_extra)
    if root:  # an explicit data.root is authoritative: never fall back silently to another copy
        root_path = Path(root)
        if not root_path.is_dir():
            raise DatasetError(f"data.root = {root!r}: directory not found")
        found, base = _find(root_path, info, roles)
        if len(found) == len(roles):
            return found
        if resolves_inside(root_path):
            present = sorted(p.name for p in root_path.iterdir())
            holds = f", but it holds {present[:8]}{' ...' if len(present) > 8 else ''}"
        else:  # an error message must not list a directory outside the repository
            holds = " (its contents are not listed: it is outside the repository)"
        raise DatasetError(
            f"data.root = {root!r} is not a '{name}' dataset directory: expected {_expected(info, roles)} "
            f"{_where(info)}{holds}{_partial(info, roles, found, base)}")
    tried = []
    candidates = []
    if info.debian_dir:
        candidates.append(Path(info.debian_dir))
    candidates.append(download_dir)
    partial = ""
    for cand in candidates:
        tried.append(str(cand))
        if cand.is_dir():
            found, base = _find(cand, info, roles)
            if len(found) == len(roles):
                return found
            partial = partial or _partial(info, roles, found, base)
    if download:
        try:
            _torchvision_download(name, download_dir, svhn_extra)
        except Exception as e:  # noqa: BLE001 - offline, DNS, HTTP errors all end the same way
            tried.append(f"download to {download_dir} (failed: {type(e).__name__}: {str(e)[:200]})")
        else:
            found, base = _find(download_dir, info, roles)
            if len(found) == len(roles):
                return found
            tried.append(f"download to {download_dir} (finished, but the files are not there)")
    else:
        tried.append("no download (data.download is false)")
    hint = f" Offline, copy them into {download_dir}/"
    if info.debian_package:
        hint = f" Offline, install it with: sudo apt-get update && sudo apt-get install -y {info.debian_package},"
    subdirs = [f"{s}/" for s in info.subdirs if s]
    where = f"in a directory or in its {' or '.join(subdirs)}" if subdirs else "in one directory"
    raise DatasetError(
        f"dataset '{name}' not found. Looked in: {tried}. Expected {_expected(info, roles)} {where}{partial}."
        f"{hint} or set data.root to a directory holding them.")


def _torchvision_download(name: str, download_dir: Path, svhn_extra: bool = False) -> None:
    """torchvision's downloader (needs internet; verifies the published md5s) into torchvision's layout."""
    import torchvision  # heavy: torchvision is imported only where it is used

    info = REGISTRY[name]
    cls = getattr(torchvision.datasets, info.torchvision_class)
    if info.format == "idx":
        for train in (True, False):
            cls(str(download_dir), train=train, download=True)
    elif info.format == "cifar":  # one archive holds both splits; loading the test split is the cheap check
        cls(str(download_dir), train=False, download=True)
    else:  # svhn: fetch the .mat files without loading them (extra alone is 1.3 GB)
        from torchvision.datasets.utils import download_url  # heavy: torchvision is imported only where it is used

        for split in _roles(info, svhn_extra):
            url, filename, md5 = cls.split_list[split]
            download_url(url, str(download_dir), filename, md5)
