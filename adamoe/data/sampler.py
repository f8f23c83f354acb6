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
  With `shuffle_batches`, the batches of `random`, `paper` and `reverse` are shuffled
  after packing: the same batches, without their order (a control for the curriculum).
Every order changes with the epoch, from the seed; `sorted` never changes.

Batches are global: with W ranks, global batch i holds consecutive samples of the order
and is split over the ranks (rank r takes every W-th sample from r), so every rank's
i-th batch is alike, and every rank takes the same number of steps without repeating a
sample. A global batch costs, per rank, (its longest sample) x (its samples per rank)
tokens, padding included, within `max_tokens`. Orders and batches are numpy arrays: an
epoch of 10M samples is planned in seconds.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler

from adamoe.errors import ConfigError

ORDERS = ("sorted", "length", "random", "paper", "reverse")


@dataclass(eq=False)
class Plan:
    """An epoch's global batches, as arrays of a few bytes per sample: batch i is
    `order[bounds[i]:bounds[i + 1]]`."""

    order: np.ndarray
    bounds: np.ndarray

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.order[self.bounds[i] : self.bounds[i + 1]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return np.array_equal(self.order, other.order) and np.array_equal(self.bounds, other.bounds)

    def reorder(self, batches: np.ndarray) -> "Plan":
        """The same batches, in the order `batches` gives."""
        sizes = np.diff(self.bounds)[batches]
        order = (
            np.concatenate([self.order[self.bounds[b] : self.bounds[b + 1]] for b in batches.tolist()])
            if len(batches)
            else self.order
        )
        return Plan(order, np.concatenate([[0], np.cumsum(sizes)]))


def pack(order: np.ndarray, lengths: np.ndarray, max_tokens: int | None, batch_size: int | None, ways: int = 1) -> Plan:
    """Cut `order` into consecutive global batches that fit the per-rank budget, greedily
    (a sample too long for the budget makes a batch alone). A last batch too small to
    give every rank a sample joins the one before it."""
    order = np.asarray(order, dtype=np.int32)  # 4 bytes a sample: the plan lives for an epoch
    n, seq = len(order), np.asarray(lengths)[order]
    shortest = max(1, int(seq.min())) if n else 1
    # The most samples a batch can hold bounds the window each step looks at.
    most = min(n, (max_tokens // shortest) * ways if max_tokens else n, batch_size * ways if batch_size else n) + 1
    per_rank = (np.arange(1, most + 1) + ways - 1) // ways
    starts, start = [0], 0
    while start < n:
        window = seq[start : start + most]
        k = per_rank[: len(window)]
        fits = np.ones(len(window), dtype=bool)
        if max_tokens:
            fits &= np.maximum.accumulate(window) * k <= max_tokens  # k is int64: no overflow
        if batch_size:
            fits &= k <= batch_size
        size = len(window) if fits.all() else max(1, int(np.argmin(fits)))
        start += size
        starts.append(start)
    if len(starts) > 2 and starts[-1] - starts[-2] < ways:
        starts.pop(-2)
    if n and starts[1] < ways:
        raise ConfigError(f"{n} samples cannot give each of {ways} ranks a batch")
    return Plan(order, np.asarray(starts, dtype=np.int64))


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


def curriculum_order(
    two_NL: torch.Tensor, tokens_NL: torch.Tensor, generator: torch.Generator, reverse: bool = False
) -> np.ndarray:
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
    two_NL, tokens_NL = two_NL.double(), tokens_NL.double()
    has = tokens_NL.sum(1) > 0
    known, unknown = has.nonzero().squeeze(1), (~has).nonzero().squeeze(1)
    tail = unknown[torch.randperm(unknown.numel(), generator=generator)].numpy()
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
    known = known.numpy()
    order = known[
        np.lexsort((share.numpy(), -sim.numpy()))
    ]  # the last key sorts first; stable, so ties keep index order
    return np.concatenate([order[::-1] if reverse else order, tail])


class ShardedBatchSampler(Sampler[list[int]]):
    """Yields this rank's part of each global batch of the epoch, in the chosen `order`.

    Its state (epoch, batches consumed this epoch, and the complexity table behind the
    curriculum) is tensors and numbers, for `state_dict`/`load_state_dict`: a run resumed
    mid-epoch continues the same order where it stopped.
    """

    def __init__(
        self,
        lengths,
        max_tokens: int | None = None,
        batch_size: int | None = None,
        order: str = "length",
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        pool: int = 0,
        shuffle_batches: bool = False,
    ):
        if not max_tokens and not batch_size:
            raise ConfigError("set max_tokens or batch_size")
        if order not in ORDERS:
            raise ConfigError(f"order must be one of {ORDERS}, got {order!r}")
        if pool < 0:
            raise ConfigError(f"pool must be >= 0, got {pool}")
        self.lengths = np.asarray(lengths, dtype=np.int32)
        self.max_tokens, self.batch_size, self.order = max_tokens, batch_size, order
        self.seed, self.num_replicas, self.rank, self.pool = seed, num_replicas, rank, pool
        self.shuffle_batches = shuffle_batches
        self.epoch, self.consumed = 0, 0
        # Per sample and MoE layer: two-expert and all tokens, from the last full epoch
        # (orders this one) and from this epoch so far. Allocated at the first record.
        self.two_NL = self.tokens_NL = self.epoch_two_NL = self.epoch_tokens_NL = None
        self._plan: tuple[int, Plan] | None = None
        # Lightning calls `set_epoch` on `batch_sampler.sampler`.
        self.sampler = self

    def set_epoch(self, epoch: int):
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def global_batches(self) -> Plan:
        """This epoch's global batches, the same on every rank."""
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self._make_batches())
        return self._plan[1]

    def _make_batches(self) -> Plan:
        n, W, lengths = len(self.lengths), self.num_replicas, self.lengths
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        if self.order == "sorted":
            return pack(np.argsort(lengths, kind="stable"), lengths, self.max_tokens, self.batch_size, W)
        if self.order == "length":
            shuffled = torch.randperm(n, generator=g, dtype=torch.int32).numpy()
            plan = pack(
                shuffled[np.argsort(lengths[shuffled], kind="stable")], lengths, self.max_tokens, self.batch_size, W
            )
            return plan.reorder(torch.randperm(len(plan), generator=g).numpy())
        if self.order == "random" or self.two_NL is None:
            order = torch.randperm(n, generator=g, dtype=torch.int32).numpy()
        else:
            order = curriculum_order(self.two_NL, self.tokens_NL, g, reverse=self.order == "reverse")
        if self.pool:
            order = order[np.lexsort((lengths[order], np.arange(n) // self.pool))]  # by length within each pool
        plan = pack(order, lengths, self.max_tokens, self.batch_size, W)
        return plan.reorder(torch.randperm(len(plan), generator=g).numpy()) if self.shuffle_batches else plan

    def __iter__(self):
        plan = self.global_batches()
        for i in range(self.consumed, len(plan)):
            yield plan[i][self.rank :: self.num_replicas].tolist()

    def __len__(self):
        return len(self.global_batches())

    def record(self, index_B: torch.Tensor, two_BL: torch.Tensor, tokens_BL: torch.Tensor):
        """Note this rank's routing counts for the samples of one training batch."""
        if self.epoch_two_NL is None:
            # Token counts, 4 bytes each: the tables are the sampler's largest state.
            shape = (len(self.lengths), two_BL.shape[1])
            self.epoch_two_NL, self.epoch_tokens_NL = (
                torch.zeros(shape, dtype=torch.int32),
                torch.zeros(shape, dtype=torch.int32),
            )
        # Added, not assigned: a sample seen twice in an epoch would show as double counts.
        index = index_B.cpu()
        self.epoch_two_NL.index_add_(0, index, two_BL.cpu().to(self.epoch_two_NL.dtype))
        self.epoch_tokens_NL.index_add_(0, index, tokens_BL.cpu().to(self.epoch_tokens_NL.dtype))

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
            **{
                k: getattr(self, k)
                for k in ("two_NL", "tokens_NL", "epoch_two_NL", "epoch_tokens_NL")
                if getattr(self, k) is not None
            },
        }

    def load_state_dict(self, state: dict):
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        if state["order"] != self.order:
            warnings.warn(
                f"resuming with order {self.order!r} from a run with {state['order']!r}: the epoch restarts",
                stacklevel=2,
            )
            self.consumed = 0
        self.two_NL, self.tokens_NL = state.get("two_NL"), state.get("tokens_NL")
        self.epoch_two_NL, self.epoch_tokens_NL = state.get("epoch_two_NL"), state.get("epoch_tokens_NL")
        if self.rank != 0 and self.epoch_two_NL is not None:
            # The saved partial counts are all ranks' sums (see `end_epoch`); keep one copy.
            self.epoch_two_NL.zero_()
            self.epoch_tokens_NL.zero_()
        self._plan = None
