"""Length-bucketed batches under a token budget, sharded over ranks without Lightning's sampler."""

import torch
from torch.utils.data import Sampler


def pack(order: list[int], lengths: list[int], max_tokens: int | None, batch_size: int | None) -> list[list[int]]:
    """Cut `order` into consecutive batches. A batch costs (samples x longest sample) tokens,
    padding included, and stays within `max_tokens` and/or `batch_size`."""
    batches, batch, longest = [], [], 0
    for i in order:
        longer = max(longest, lengths[i])
        if batch and ((max_tokens and longer * (len(batch) + 1) > max_tokens) or (batch_size and len(batch) >= batch_size)):
            batches.append(batch)
            batch, longer = [], lengths[i]
        batch.append(i)
        longest = longer
    if batch:
        batches.append(batch)
    return batches


class TokenBatchSampler(Sampler[list[int]]):
    """fairseq-style `--max-tokens` batching.

    Training (`shuffle=True`): samples are shuffled, then sorted by length, so that each
    batch holds similar lengths with little padding; the batch order is then shuffled,
    differently every epoch (`set_epoch`). With W ranks, global batch i goes to rank
    i % W. When the number of batches does not divide by W, the first few batches of the
    epoch are repeated at its end so every rank takes the same number of steps, as
    PyTorch's DistributedSampler does with samples.

    Evaluation (`shuffle=False`): batches in length order, rank r takes batches r, r+W, ...;
    nothing is repeated, so ranks may differ by one batch.
    """

    def __init__(self, lengths: list[int], max_tokens: int | None = None, batch_size: int | None = None, shuffle: bool = True,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if not max_tokens and not batch_size:
            raise ValueError("set max_tokens or batch_size")
        self.lengths, self.max_tokens, self.batch_size = lengths, max_tokens, batch_size
        self.shuffle, self.seed, self.num_replicas, self.rank = shuffle, seed, num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            return pack(sorted(range(n), key=self.lengths.__getitem__), self.lengths, self.max_tokens, self.batch_size)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = sorted(torch.randperm(n, generator=g).tolist(), key=self.lengths.__getitem__)
        batches = pack(order, self.lengths, self.max_tokens, self.batch_size)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        short = -len(batches) % self.num_replicas
        return batches + batches[:short]

    def __iter__(self):
        yield from self.global_batches()[self.rank :: self.num_replicas]

    def __len__(self):
        return len(self.global_batches()[self.rank :: self.num_replicas])
