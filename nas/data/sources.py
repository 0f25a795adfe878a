"""Readers for image data that ships inside registry packages (no network)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

from nas.core.errors import NasError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip


def read_idx_gz(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise NasError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_DIR,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (60000x28x28 uint8, labels), 'test': (10000x28x28, labels)}."""
    root = Path(root)
    files = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    if not (root / files["train"][0]).is_file():
        raise NasError(
            f"Fashion-MNIST not found in {root}; install it with "
            "'apt-get install dataset-fashion-mnist' (Debian) or point to a folder holding "
            "the four *-idx*-ubyte.gz files"
        )
    return {
        split: (read_idx_gz(root / images), read_idx_gz(root / labels).astype(np.int64))
        for split, (images, labels) in files.items()
    }


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers, and nothing that could run code."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 28x28 animal silhouettes (10 classes) shipped in the animal-mnist package.

    Read directly from the package's data files; its own loader imports tensorflow."""
    import importlib.util

    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise NasError(
            "the animal-mnist package is not installed; bash scripts/setup.sh installs it "
            "(pip install --no-deps animal-mnist)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        images = np.asarray(_ArraysOnly(f).load(), dtype=np.uint8)
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(_ArraysOnly(f).load()).astype(np.int64)
    return images, labels
