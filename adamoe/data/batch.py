"""The contract between data and tasks: what a batch holds, how samples become one, and
how its tokens are counted."""

from collections.abc import Sequence
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from adamoe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

# Pads per-token label columns: the value F.cross_entropy and torchmetrics skip (ignore_index).
IGNORE_ID = -100


class Batch(TypedDict, total=False):
    """What a task's step receives; a data module fills the keys its task has. Sequences
    are right-padded with PAD_ID; a task may add columns of its own (see `collate`)."""

    index: Tensor  # [B] each sample's position in its split: always there
    src: Tensor  # [B, S] source ids, ending in </s>
    src_pad: Tensor  # [B, S] True at padding
    tgt_in: Tensor  # [B, S] what the decoder reads: <s>, then the target without its </s>
    tgt_out: Tensor  # [B, S] what it predicts: the target, then </s>
    tgt_pad: Tensor  # [B, S] True at padding of tgt_out
    label: Tensor  # [B] class ids
    target: list[str]  # reference texts, for BLEU
    # A task's own columns: per-sample values become [B], lists of numbers [B, L] padded with IGNORE_ID.


def _pad(rows: list[Sequence], value: int = PAD_ID) -> Tensor:
    first = torch.as_tensor(rows[0])
    out = torch.full(
        (len(rows), max(map(len, rows))), value, dtype=torch.long if not first.is_floating_point() else first.dtype
    )
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = torch.as_tensor(ids)
    return out


def collate(indices: Sequence[int], columns: dict[str, list]) -> Batch:
    """A batch of the samples `indices`, from each column's values for them, in that order.
    `src` and `tgt` are token ids, padded (`tgt` also shifted into decoder input and
    output); string columns stay lists; any other column becomes a tensor of one value
    (or equal-length list) per sample."""
    batch: Batch = {"index": torch.as_tensor(indices)}
    for name, rows in columns.items():
        if name == "src":
            batch["src"] = _pad(rows)
            batch["src_pad"] = batch["src"].eq(PAD_ID)
        elif name == "tgt":
            tgt_out = _pad(rows)
            tgt_pad = tgt_out.eq(PAD_ID)
            # Teacher forcing: position i reads token i - 1 and predicts token i. The shift
            # moves each row's final </s> onto its first padding position, where it is no input.
            tgt_in = F.pad(tgt_out, (1, 0), value=BOS_ID)[:, :-1].masked_fill(tgt_pad, PAD_ID)
            batch.update(tgt_in=tgt_in, tgt_out=tgt_out, tgt_pad=tgt_pad)
        elif rows and isinstance(rows[0], str):
            batch[name] = rows
        elif rows and isinstance(rows[0], (list, tuple)):
            batch[name] = _pad(rows, IGNORE_ID)
        else:
            batch[name] = torch.as_tensor(rows)
    return batch


def token_counts(batch: Batch) -> tuple[Tensor, Tensor]:
    """Non-padding source and target tokens of each sample, [B] each; zeros for a side the
    batch does not have."""
    zeros = torch.zeros_like(batch["index"])
    src = (~batch["src_pad"]).sum(1) if "src_pad" in batch else zeros
    tgt = (~batch["tgt_pad"]).sum(1) if "tgt_pad" in batch else zeros
    return src, tgt


__all__ = ["Batch", "EOS_ID", "IGNORE_ID", "collate", "token_counts"]
