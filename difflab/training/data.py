"""A data order that is a pure function of ``(seed, step)``, so training resumes mid-epoch.

The stream of indices is the concatenation of per-epoch permutations, epoch ``e`` drawn from a
``torch.Generator`` seeded with ``(seed, e)``. Optimizer step ``k`` takes positions
``[k B, (k + 1) B)`` of the stream (``B`` the global batch); that batch is cut into
``grad_accum x num_processes`` equal micro-batches and process ``r`` takes micro-batch
``m * num_processes + r`` at accumulation step ``m``. The same global batches are therefore
seen whatever the number of processes, and nothing but the step needs saving to resume.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from difflab.data import collate
from difflab.errors import DifflabError


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (NumPy's ``SeedSequence`` hash: well spread, stable)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


class BatchOrder:
    """Which dataset indices micro-batch ``(step, micro, rank)`` holds.

    Args:
        n: dataset length.
        seed: the run's seed.
        batch_size: global batch of one optimizer step.
        grad_accum: micro-batches per optimizer step.
        num_processes: data-parallel processes.
    """

    def __init__(self, n: int, seed: int, batch_size: int, grad_accum: int = 1,
                 num_processes: int = 1) -> None:
        if n < 1:
            raise DifflabError("the training dataset is empty")
        parts = grad_accum * num_processes
        if batch_size % parts:
            raise DifflabError(
                f"train.batch_size={batch_size} must be divisible by grad_accum x processes = "
                f"{grad_accum} x {num_processes} = {parts} (it is the global batch of one "
                "optimizer step)"
            )
        self.n, self.seed, self.batch_size = n, seed, batch_size
        self.grad_accum, self.num_processes = grad_accum, num_processes
        self.micro = batch_size // parts
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, 0xDA7A, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def positions(self, start: int, count: int) -> list[int]:
        """Dataset indices at stream positions ``[start, start + count)``."""
        out: list[int] = []
        while count > 0:
            epoch, offset = divmod(start, self.n)
            take = min(count, self.n - offset)
            out += self.permutation(epoch)[offset:offset + take].tolist()
            start, count = start + take, count - take
        return out

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        """The indices of micro-batch ``micro`` of process ``rank`` at optimizer step ``step``."""
        part = micro * self.num_processes + rank
        return self.positions(step * self.batch_size + part * self.micro, self.micro)

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n


class _StepBatches:
    """A batch sampler over optimizer steps ``[start, stop)`` for one process."""

    def __init__(self, order: BatchOrder, start: int, stop: int, rank: int) -> None:
        self.order, self.start, self.stop, self.rank = order, start, stop, rank

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            for micro in range(self.order.grad_accum):
                yield self.order.indices(step, micro, self.rank)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.order.grad_accum


def micro_batches(dataset: Dataset, order: BatchOrder, start: int, stop: int, rank: int,
                  num_workers: int = 0) -> DataLoader:
    """Collated micro-batches ``(x, Cond)`` of steps ``[start, stop)`` for process ``rank``."""
    return DataLoader(dataset, batch_sampler=_StepBatches(order, start, stop, rank),
                      num_workers=num_workers, collate_fn=collate,
                      persistent_workers=False)
