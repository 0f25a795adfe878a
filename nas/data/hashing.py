"""Content fingerprints of images and files, for de-duplication and provenance."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def image_fingerprints(images: np.ndarray) -> np.ndarray:
    """A 64-bit fingerprint (the first 8 bytes of SHA-256) of each image's uint8 pixels."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    flat = images.reshape(len(images), -1)
    return np.array(
        [int.from_bytes(hashlib.sha256(row.tobytes()).digest()[:8], "little") for row in flat],
        dtype=np.uint64,
    )


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
