"""Datasets: raw on-disk formats -> uint8 tensors, and the batch loaders. One module per concept:

  limits (budget, size checks, DatasetError), registry (the datasets, where their files are), idx / cifar /
  svhn (one reader per format family), prepare (-> data/prepared/dataset.pt), loader (tensor-resident),
  imagefolder + decoded + streaming + preprocessing (your own images; for sets larger than RAM, each split
  decoded once into a uint8 array on disk, and the loader that reads its batches).

``prepare`` converts a dataset once into ``data/prepared/dataset.pt``: uint8 images (N, C, H, W),
int64 labels and metadata. Training never touches a per-sample Dataset/DataLoader: the whole
split stays in memory as one tensor, and augmentation (random crop via padding + gather,
random horizontal flip where it is label-preserving) is done per batch with tensor ops.

Five datasets, each in the format torchvision downloads (``REGISTRY``):

- ``mnist``, ``fashion_mnist``: the four IDX files, gzipped or not, flat in a directory (the
  Debian package's ``/usr/share/datasets/fashion-mnist/``) or in torchvision's
  ``<root>/MNIST/raw/`` / ``<root>/FashionMNIST/raw/``. Where torchvision's own ``MNIST`` /
  ``FashionMNIST`` class can read them (its layout, uncompressed files: with ``download=False`` it
  only checks that they exist) they are read through it; the gzipped and flat layouts, which it
  cannot open, are read by ``read_idx``.
- ``cifar10``, ``cifar100``: the python pickles of ``cifar-10-batches-py/`` and
  ``cifar-100-python/``; ``svhn``: ``train_32x32.mat``, ``test_32x32.mat`` and, with
  ``data.svhn_extra``, ``extra_32x32.mat``. torchvision's CIFAR and SVHN classes refuse any file
  whose md5 differs from the published one (so every format-true test fixture is "corrupted" to
  them), hence these formats are read here directly: the pickles with ``_RestrictedUnpickler``,
  which only resolves the numpy globals an array needs (a pickle naming anything else, e.g.
  ``os.system``, is refused before it can run), and the ``.mat`` files with ``scipy.io.loadmat``,
  mapping SVHN's label 10 to digit 0 as torchvision does.

Hostile or corrupt files are refused, with a one-line ``DatasetError``, before they can cost memory:
every size a file declares (an IDX header, a pickled array, a .mat variable header) is checked, in
Python ints, against the file's own size, the published file's image count (``DatasetInfo.max_images``)
and ``MEMORY_BUDGET`` before anything is allocated, and compressed data is never decompressed past
its declared size. An empty split or a constant (zero-std) train split is refused too.

Search order (``locate_raw``): an explicit ``data.root`` only; otherwise the Debian package's
directory (Fashion-MNIST has one), then ``data/raw/``, then torchvision's downloader into
``data/raw/`` when ``data.download`` is true.
"""

from kdprune.data.cifar import read_cifar_pickle
from kdprune.data.idx import read_idx, write_idx
from kdprune.data.limits import MEMORY_BUDGET, DatasetError
from kdprune.data.loader import TensorLoader
from kdprune.data.prepare import _stratified_subset, channel_stats, load_prepared, prepare_dataset
from kdprune.data.registry import FOLDER_DATASETS, REGISTRY, DatasetInfo, locate_raw
from kdprune.data.svhn import read_svhn_mat

__all__ = ["DatasetError", "DatasetInfo", "FOLDER_DATASETS", "MEMORY_BUDGET", "REGISTRY", "TensorLoader", "channel_stats",
           "load_prepared", "locate_raw", "prepare_dataset", "read_cifar_pickle", "read_idx", "read_svhn_mat",
           "write_idx", "_stratified_subset"]
