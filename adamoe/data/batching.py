"""Batches under a token budget, in a chosen order, sharded over ranks without Lightning's sampler.

Orders:
- `sorted`: by length, for evaluation;
- `length`: fairseq-style buckets: shuffle, sort by length, pack, shuffle the batches;
- `random`: a seeded shuffle, packed as it comes;
- `paper`: the curriculum of Li et al. (2023), section 3.2, from last epoch's routing
  complexity (see `curriculum_order`); `reverse`: the same, most complex first.
  With `pool` > 0, the curriculum order is cut into consecutive pools of `pool` samples
  and each pool is sorted by length before packing: batches keep their place in the
  curriculum, but stop mixing lengths, which under a token budget costs padding and steps.
Every order changes with the epoch, from the seed; `sorted` never changes.

Batches are global: with W ranks, global batch i holds consecutive samples of the order
and is split over the ranks (rank r takes every W-th sample from r), so every rank's
i-th batch is alike, and every rank takes the same number of steps without repeating a
sample. A global batch costs, per rank, (its longest sample) x (its samples per rank)
tokens, padding included, within `max_tokens`.
"""

import math
import warnings

import torch
from torch.utils.data import Sampler

from adamoe.errors import ConfigError

ORDERS = ("sorted", "length", "random", "paper", "reverse")


def pack(order: list[int], lengths: list[int], max_tokens: int | None, batch_size: int | None, ways: int = 1) -> list[list[int]]:
    """Cut `order` into consecutive global batches that fit the per-rank budget. A last
    batch too small to give every rank a sample joins the one before it."""
    batches, batch, longest = [], [], 0
    for i in order:
        longer = max(longest, lengths[i])
        per_rank = math.ceil((len(batch) + 1) / ways)
        if batch and ((max_tokens and longer * per_rank > max_tokens) or (batch_size and per_rank > batch_size)):
            batches.append(batch)
            batch, longer = [], lengths[i]
        batch.append(i)
        longest = longer
    if batch:
        if len(batch) < ways and batches:
            batches[-1] += batch
        else:
            batches.append(batch)
    if batches and len(batches[0]) < ways:
        raise ConfigError(f"{len(order)} samples cannot give each of {ways} ranks a batch")
    return batches


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks from 0, ties sharing their average rank."""
    uniq, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    return (first + (counts - 1) / 2.0).double()[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    return float((rx * ry).sum() / denom) if denom > 0 else 0.0


def curriculum_order(two_NL: torch.Tensor, tokens_NL: torch.Tensor, generator: torch.Generator, reverse: bool = False) -> list[int]:
    """The paper's order from per-sample, per-layer counts of two-expert and all tokens.

    C_d = two_d / tokens_d per layer (eq. 5). The anchor is the sample with the fewest
    two-expert tokens in all (lowest index on ties). Samples are ordered by the cosine
    similarity of C_d to the anchor's C, most similar first. Cosine similarity is not
    defined for a zero vector, and the anchor's is often zero (no token of it took two
    experts): a zero vector is taken as similar (1) to a zero vector and unlike (0) to any
    other. Ties are broken by the overall two-expert share, lowest first, then by index,
    so the order runs from simple to complex. Samples without statistics (not yet trained
    on) go last, in seeded random order.
    """
    has = tokens_NL.sum(1) > 0
    known, unknown = has.nonzero().squeeze(1), (~has).nonzero().squeeze(1)
    tail = unknown[torch.randperm(unknown.numel(), generator=generator)].tolist()
    if known.numel() == 0:
        return tail
    C = two_NL[known] / tokens_NL[known].clamp_min(1)
    two = two_NL[known].sum(1)
    anchor = C[int(torch.argmin(two))]  # argmin returns the first minimum
    norms, a = C.norm(dim=1), anchor.norm()
    if a > 0:
        sim = torch.where(norms > 0, C @ anchor / (norms * a).clamp_min(1e-300), torch.zeros_like(norms))
    else:
        sim = (norms == 0).double()
    share = two / tokens_NL[known].sum(1)
    keys = sorted(range(known.numel()), key=lambda i: (-sim[i].item(), share[i].item(), known[i].item()))
    order = [known[i].item() for i in keys]
    return (order[::-1] if reverse else order) + tail


class ShardedBatchSampler(Sampler[list[int]]):
    """Yields this rank's part of each global batch of the epoch, in the chosen `order`.

    Its state (epoch, batches consumed this epoch, and the complexity table behind the
    curriculum) is tensors and numbers, for `state_dict`/`load_state_dict`: a run resumed
    mid-epoch continues the same order where it stopped.
    """

    def __init__(
        self,
        lengths: list[int],
        max_tokens: int | None = None,
        batch_size: int | None = None,
        order: str = "length",
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        pool: int = 0,
    ):
        if not max_tokens and not batch_size:
            raise ConfigError("set max_tokens or batch_size")
        if order not in ORDERS:
            raise ConfigError(f"order must be one of {ORDERS}, got {order!r}")
        if pool < 0:
            raise ConfigError(f"pool must be >= 0, got {pool}")
        self.lengths, self.max_tokens, self.batch_size, self.order = lengths, max_tokens, batch_size, order
        self.seed, self.num_replicas, self.rank, self.pool = seed, num_replicas, rank, pool
        self.epoch, self.consumed = 0, 0
        # Per sample and MoE layer: two-expert and all tokens, from the last full epoch
        # (orders this one) and from this epoch so far. Allocated at the first record.
        self.two_NL = self.tokens_NL = self.epoch_two_NL = self.epoch_tokens_NL = None
        self._plan: tuple[int, list[list[int]]] | None = None
        # Lightning calls `set_epoch` on `batch_sampler.sampler`.
        self.sampler = self

    def set_epoch(self, epoch: int):
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches, the same on every rank."""
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self._make_batches())
        return self._plan[1]

    def _make_batches(self) -> list[list[int]]:
        n, W = len(self.lengths), self.num_replicas
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        if self.order == "sorted":
            return pack(sorted(range(n), key=self.lengths.__getitem__), self.lengths, self.max_tokens, self.batch_size, W)
        if self.order == "length":
            order = sorted(torch.randperm(n, generator=g).tolist(), key=self.lengths.__getitem__)
            batches = pack(order, self.lengths, self.max_tokens, self.batch_size, W)
            return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        if self.order == "random" or self.two_NL is None:
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = curriculum_order(self.two_NL, self.tokens_NL, g, reverse=self.order == "reverse")
        if self.pool:
            order = [i for start in range(0, n, self.pool) for i in sorted(order[start : start + self.pool], key=self.lengths.__getitem__)]
        return pack(order, self.lengths, self.max_tokens, self.batch_size, W)

    def __iter__(self):
        for batch in self.global_batches()[self.consumed :]:
            yield batch[self.rank :: self.num_replicas]

    def __len__(self):
        return len(self.global_batches())

    def record(self, index_B: torch.Tensor, two_BL: torch.Tensor, tokens_BL: torch.Tensor):
        """Note this rank's routing counts for the samples of one training batch."""
        if self.epoch_two_NL is None:
            shape = (len(self.lengths), two_BL.shape[1])
            self.epoch_two_NL, self.epoch_tokens_NL = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
        # Added, not assigned: a sample seen twice in an epoch would show as double counts.
        index = index_B.cpu()
        self.epoch_two_NL.index_add_(0, index, two_BL.double().cpu())
        self.epoch_tokens_NL.index_add_(0, index, tokens_BL.double().cpu())

    def sync_partial(self, reduce):
        """Before a checkpoint: rank 0 takes every rank's counts of this epoch so far (every
        rank calls it), so that its checkpoint holds them all; the others restart at zero."""
        if self.epoch_two_NL is None:
            return
        two, tokens = reduce(self.epoch_two_NL), reduce(self.epoch_tokens_NL)
        if self.rank == 0:
            self.epoch_two_NL, self.epoch_tokens_NL = two, tokens
        else:
            self.epoch_two_NL.zero_()
            self.epoch_tokens_NL.zero_()

    def end_epoch(self, reduce):
        """Sum this epoch's counts over ranks with `reduce` (every rank calls it) and make them
        the table that orders the next epoch. Returns the summed (two, tokens) tables."""
        if self.epoch_two_NL is None:
            return None
        # `reduce` may work in place: copy before zeroing the running counts.
        self.two_NL, self.tokens_NL = reduce(self.epoch_two_NL).clone(), reduce(self.epoch_tokens_NL).clone()
        self.epoch_two_NL.zero_()
        self.epoch_tokens_NL.zero_()
        return self.two_NL, self.tokens_NL

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "order": self.order,
            **{k: getattr(self, k) for k in ("two_NL", "tokens_NL", "epoch_two_NL", "epoch_tokens_NL") if getattr(self, k) is not None},
        }

    def load_state_dict(self, state: dict):
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        if state["order"] != self.order:
            warnings.warn(f"resuming with order {self.order!r} from a run with {state['order']!r}: the epoch restarts", stacklevel=2)
            self.consumed = 0
        self.two_NL, self.tokens_NL = state.get("two_NL"), state.get("tokens_NL")
        self.epoch_two_NL, self.epoch_tokens_NL = state.get("epoch_two_NL"), state.get("epoch_tokens_NL")
        if self.rank != 0 and self.epoch_two_NL is not None:
            # The saved partial counts are all ranks' sums (see `end_epoch`); keep one copy.
            self.epoch_two_NL.zero_()
            self.epoch_tokens_NL.zero_()
        self._plan = None
