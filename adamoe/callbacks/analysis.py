"""Which words get two experts (the paper's Table 4), per MoE layer, on the validation set."""

import csv
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback

from adamoe.data.tokenizer import WORD_START


def words_of(pieces: list[str]) -> list[int]:
    """For each BPE piece, the index of the word it belongs to (a word starts at a piece
    beginning with the word-start mark); -1 for special tokens."""
    owner, word = [], -1
    for p in pieces:
        if p.startswith("<") and p.endswith(">"):
            owner.append(-1)
            continue
        if p.startswith(WORD_START) or word < 0:
            word += 1
        owner.append(word)
    return owner


def count_words(tokens_BS: torch.Tensor, two_BS: torch.Tensor, id_to_token) -> tuple[Counter, Counter]:
    """Per word: how often it occurs, and how often any of its pieces took two experts."""
    seen, two = Counter(), Counter()
    for ids, flags in zip(tokens_BS.tolist(), two_BS.tolist()):
        pieces = [id_to_token(i) or "" for i in ids]
        owner = words_of(pieces)
        words: dict[int, list] = {}
        for piece, w, flag in zip(pieces, owner, flags):
            if w >= 0:
                entry = words.setdefault(w, ["", False])
                entry[0] += piece
                entry[1] |= bool(flag)
        for text, flag in words.values():
            text = text.replace(WORD_START, "")
            if text:
                seen[text] += 1
                two[text] += flag
    return seen, two


class RoutingAnalysis(Callback):
    """At the end of fit: per MoE layer, the words most and least often sent to two
    experts on the validation set (words seen at least `min_count` times), with counts.
    BPE pieces are merged back into words; a word counts as two-expert when any of its
    pieces took two experts. Written as TensorBoard text and as `routing_words.tsv` in
    the run folder. Encoder layers see source words; decoder layers the target words they
    read (teacher-forced).
    """

    def __init__(self, top_k: int = 10, min_count: int = 5):
        self.top_k, self.min_count = top_k, min_count

    @torch.no_grad()
    def on_fit_end(self, trainer, pl_module):
        model, dm = pl_module.net, trainer.datamodule
        names = model.moe_layer_names
        if not names:
            return
        seen = [Counter() for _ in names]
        two = [Counter() for _ in names]
        was_training = model.training
        model.eval()
        for batch in dm.val_dataloader():
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            _, routings = pl_module(batch)
            for i, (r, side) in enumerate(zip(routings, model.moe_layer_sides)):
                tokens = batch["src"] if side == "source" else batch["tgt_in"]
                s, t = count_words(tokens, r.experts_per_token_T.view(tokens.shape) >= 2, dm.tokenizer.id_to_token)
                seen[i].update(s)
                two[i].update(t)
        model.train(was_training)
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (seen, two))
            seen = [sum((g[0][i] for g in gathered), Counter()) for i in range(len(names))]
            two = [sum((g[1][i] for g in gathered), Counter()) for i in range(len(names))]
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if trainer.is_global_zero and log_dir is not None:
            self._write(trainer, Path(log_dir), names, seen, two)

    def rank(self, seen: Counter, two: Counter) -> tuple[list, list]:
        rows = [(w, n, two[w], two[w] / n) for w, n in seen.items() if n >= self.min_count]
        most = sorted(rows, key=lambda r: (-r[3], -r[1], r[0]))[: self.top_k]
        least = sorted(rows, key=lambda r: (r[3], -r[1], r[0]))[: self.top_k]
        return most, least

    def _write(self, trainer, log_dir, names, seen, two):
        log_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        with open(log_dir / "routing_words.tsv", "w", newline="") as f:
            out = csv.writer(f, delimiter="\t", lineterminator="\n")
            out.writerow(["layer", "list", "rank", "word", "count", "two_expert_count", "two_expert_share"])
            for name, s, t in zip(names, seen, two):
                most, least = self.rank(s, t)
                for kind, rows in (("most", most), ("least", least)):
                    for k, (w, n, m, share) in enumerate(rows, 1):
                        out.writerow([name, kind, k, w, n, m, f"{share:.4f}"])
                lines.append(f"**{name}** most: " + ", ".join(f"{w} ({m}/{n})" for w, n, m, _ in most))
                lines.append(f"**{name}** least: " + ", ".join(f"{w} ({m}/{n})" for w, n, m, _ in least))
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("experts/two_expert_words", "\n\n".join(lines), trainer.global_step)
