"""Deterministic global batches, split into per-rank micro-batches.

The order of samples is a pure function of (seed, epoch), so a resumed run sees exactly the
batches an uninterrupted run would, and N processes with gradient accumulation A see exactly the
samples one process sees with accumulation N·A (same global batch): global batch b is cut into
N·A micro-batches; rank r takes micro-batches ``a·N + r`` for a = 0..A-1.

The lengths they group by are counted as the model splices, by the data layer's
:class:`~hires_lmm.data.records.VisualTokenCounter` (a composed method's compressed count, within
the model's visual-token budget) when the trainer validates its records.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence


class GlobalBatches:
    """Global batches of ``micro · world · accum`` sample indices per optimizer step.

    Args:
        lengths: per-sample sequence length (text + visual tokens), for length grouping.
        micro: samples per micro-batch (per process, per forward).
        world, rank, accum: processes, this process, gradient-accumulation steps.
        group_by_length: LLaVA's grouping: shuffle, cut into megabatches of one global batch,
            sort each by length (so padding is small), shuffle the order of batches.
    """

    def __init__(self, lengths: Sequence[int], micro: int, *, world: int = 1, rank: int = 0, accum: int = 1,
                 seed: int = 0, group_by_length: bool = True) -> None:
        if micro < 1 or accum < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError("micro, accum, world must be ≥ 1 and 0 ≤ rank < world")
        if not lengths:
            raise ValueError("no samples to train on")
        self.lengths = list(lengths)
        self.micro, self.world, self.rank, self.accum = micro, world, rank, accum
        self.seed, self.group_by_length = seed, group_by_length

    @property
    def global_batch(self) -> int:
        return self.micro * self.world * self.accum

    def epoch(self, epoch: int) -> list[list[int]]:
        """The global batches of an epoch. The last partial batch is filled by wrapping around, so
        every rank always gets full micro-batches (and tiny datasets still yield a batch)."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        idx = list(range(len(self.lengths)))
        rng.shuffle(idx)
        G, n = self.global_batch, len(idx)
        idx += [idx[k % n] for k in range(-n % G)]
        batches = [idx[i:i + G] for i in range(0, len(idx), G)]
        if self.group_by_length:
            batches = [sorted(b, key=lambda i: -self.lengths[i]) for b in batches]
            rng.shuffle(batches)
        return batches

    def steps_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.global_batch)

    def micro_batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """This rank's micro-batches of ``epoch`` from global batch ``start`` on, in order
        (``accum`` consecutive micro-batches make one optimizer step)."""
        for batch in self.epoch(epoch)[start:]:
            chunks = [batch[j * self.micro:(j + 1) * self.micro] for j in range(self.world * self.accum)]
            for a in range(self.accum):
                yield chunks[a * self.world + self.rank]
