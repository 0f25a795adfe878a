"""Batches from decoded tensors: the whole split sits on the training device as uint8 and each
batch is gathered, normalised and augmented there with batched tensor ops."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from nas.data.augment import normalise, random_crop_flip
from nas.data.decode import DecodedSplit


class TensorLoader:
    """Iterate (images, labels) batches of a decoded split.

    Args:
        split: the decoded split.
        batch_size: images per batch.
        mean, std: per-channel normalisation, in [0, 1] units (the backbone's).
        shuffle: a new order each epoch, from ``seed`` and the epoch number (reproducible, and
            resumable: ``set_epoch`` restores the order of any epoch).
        device: where the images are kept and batches are made.
        crop_pad, hflip: random-crop padding and horizontal flips (training only).
        drop_last: drop a final incomplete batch.
    """

    def __init__(
        self,
        split: DecodedSplit,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        shuffle: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        crop_pad: int = 0,
        hflip: bool = False,
        drop_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size = batch_size
        self.mean, self.std = list(mean), list(std)
        self.shuffle, self.seed = shuffle, seed
        self.crop_pad, self.hflip = crop_pad, hflip
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        self.epoch += 1
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx]
            if self.crop_pad or self.hflip:
                x = random_crop_flip(x, self.crop_pad, self.hflip, gen)
            yield normalise(x, self.mean, self.std), self.labels[idx]
