"""Decode once: a split's images become one uint8 tensor (N, C, H, W) at the model's input
size, kept in memory and optionally cached on disk.

VTAB-1k trains on 1,000 images for hundreds of epochs: decoding them every epoch would make
the loader the bottleneck. Images are resized directly to the model's square input (bicubic),
as NOAH does for VTAB-1k, and converted to the backbone's channel count.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from nas.data.lists import DataError, Entry, Split

CACHE_VERSION = 1


@dataclass
class DecodedSplit:
    """A split as tensors: uint8 images (N, C, H, W) and int64 labels (N,)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def content_hash(self) -> str:
        """SHA-256 of the decoded pixels and labels: the same data gives the same hash
        wherever it lives, for provenance."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.images.numpy()).tobytes())
        digest.update(self.labels.numpy().astype(np.int64).tobytes())
        return digest.hexdigest()


def decode_image(entry: Entry, size: tuple[int, int], channels: int) -> np.ndarray:
    """One image as uint8 (C, H, W); a corrupt or unreadable file is a DataError."""
    try:
        with Image.open(entry.path) as img:
            img.load()
            return model_array(img, size, channels)
    except Image.DecompressionBombError as exc:  # a few bytes that decode to gigapixels
        raise DataError(f"{entry.source}: refused image {entry.path}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{entry.source}: cannot decode image {entry.path}: {exc}") from None


def model_array(img: Image.Image, size: tuple[int, int], channels: int) -> np.ndarray:
    """A PIL image as the model's uint8 (C, H, W): ``channels`` (greyscale or RGB), resized
    bicubic to ``size`` (H, W)."""
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    array = np.asarray(img, dtype=np.uint8)
    if channels == 1:
        return array[None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _cache_key(split: Split, size: tuple[int, int], channels: int) -> str:
    items = []
    for e in split.entries:
        st = os.stat(e.path)
        items.append([str(e.path), st.st_size, st.st_mtime_ns, e.label])
    blob = json.dumps([CACHE_VERSION, list(size), channels, items])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def decode_split(
    split: Split,
    size: int | tuple[int, int],
    channels: int,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
) -> DecodedSplit:
    """Decode every image of ``split`` once. With ``cache_dir``, the result is stored there
    (keyed by the files' paths, sizes, modification times, labels, size and channels) and a
    later call reads it back instead of decoding again."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    labels = torch.tensor(split.labels, dtype=torch.int64)
    cached = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cached = cache_dir / f"{_cache_key(split, size, channels)}.npy"
        if cached.is_file():
            images = torch.from_numpy(np.load(cached, mmap_mode="r").copy())
            return DecodedSplit(
                split.name, images, labels, split.num_classes, split.class_names, split.source
            )
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        arrays = list(pool.map(lambda e: decode_image(e, size, channels), split.entries))
    stacked = np.stack(arrays)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, stacked)
        os.replace(tmp, cached)  # atomic: a concurrent reader never sees half a file
    return DecodedSplit(
        split.name,
        torch.from_numpy(stacked),
        labels,
        split.num_classes,
        split.class_names,
        split.source,
    )
