"""The order in which training samples are drawn: seeded, sharded across processes, resumable.

The global stream is an endless concatenation of epochs, each a seeded permutation of the
images; its position p is a single integer (the number of samples drawn so far, over all
processes). Process r of W takes the positions p = r, r + W, r + 2W, ... . With a global batch
B (a multiple of W), optimizer step k consumes positions [kB, (k+1)B): process r's share is the
same images, with the same crops, whatever W is. So:

- resuming needs only the position (kept in the checkpoint);
- W processes with batch B/W each see exactly the samples one process sees with batch B.

Each sample also carries a seed derived from (run seed, position) that drives its random crop,
flip and blur, so augmentation is reproducible in any DataLoader worker.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

# Stream tags keep the seeds drawn for different purposes independent of each other.
ORDER_TAG, SAMPLE_TAG = 1, 2


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream named by `keys`, mixed from `seed` (numpy's SeedSequence:
    nearby inputs give unrelated outputs)."""
    words = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31 ^ int(words[1])) & (2 ** 63 - 1)


class TrainingOrder:
    """Process `rank`'s share of the global sample stream over `num_images` images.

    Iterating yields micro-batches: lists of `micro_batch` keys (image_index, sample_seed),
    starting at global position `start` (which must be a multiple of world_size)."""

    def __init__(self, num_images: int, seed: int, micro_batch: int, *, start: int = 0,
                 rank: int = 0, world_size: int = 1):
        if num_images < 1:
            raise ValueError("TrainingOrder needs at least one image")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if start % world_size:
            raise ValueError(f"start position {start} must be a multiple of world_size {world_size}")
        self.num_images, self.seed, self.micro_batch = num_images, seed, micro_batch
        self.start, self.rank, self.world_size = start, rank, world_size
        self._epoch, self._permutation = -1, None

    def image_at(self, position: int) -> int:
        """The image index at global stream `position`."""
        epoch, offset = divmod(position, self.num_images)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, ORDER_TAG, epoch))
            self._permutation = torch.randperm(self.num_images, generator=generator).tolist()
            self._epoch = epoch
        return self._permutation[offset]

    def keys(self) -> Iterator[tuple[int, int]]:
        """This process's (image_index, sample_seed) keys, endlessly."""
        position = self.start + self.rank
        while True:
            yield self.image_at(position), derive_seed(self.seed, SAMPLE_TAG, position)
            position += self.world_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        keys = self.keys()
        while True:
            yield [next(keys) for _ in range(self.micro_batch)]
