"""Joint BPE vocabulary, trained once on the training split and cached by content."""

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from adamoe.errors import ConfigError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]  # ids 0..3, in this order
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
WORD_START = "\u2581"  # marks the first piece of every word, so pieces merge back into words


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_START)
    tok.decoder = decoders.Metaspace(replacement=WORD_START)
    # Every sequence ends in </s>, added where the ids are made instead of by copying them.
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, EOS_ID)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ConfigError(f"BPE produced {tok.get_vocab_size()} tokens, more than vocab_size={vocab_size}")
    return tok


def word_starts(tokenizer: Tokenizer, ids: Iterable[int]) -> list[bool]:
    """Which tokens begin a word (pieces are marked with WORD_START at a word's start)."""
    return [(tokenizer.id_to_token(i) or "").startswith(WORD_START) for i in ids]


def align_labels(tokenizer: Tokenizer, ids: list[int], word_labels: list[int], ignore: int = -100) -> list[int]:
    """Word-level labels on a text's token ids: each word's label on its first piece,
    `ignore` on its other pieces and on </s>, so that a loss counts every word once."""
    starts = [i for i, start in enumerate(word_starts(tokenizer, ids)) if start]
    if len(starts) != len(word_labels):
        raise ValueError(f"{len(word_labels)} labels for a text of {len(starts)} words")
    out = [ignore] * len(ids)
    for position, label in zip(starts, word_labels):
        out[position] = label
    return out


def load_or_train(path: Path, texts: Iterable[str], vocab_size: int) -> tuple[Tokenizer, bool]:
    """The tokenizer cached at `path`, or a new one trained on `texts` and saved there.
    Returns it and whether it came from the cache."""
    if path.exists():
        try:
            return Tokenizer.from_file(str(path)), True
        except Exception as e:  # the tokenizers library raises its own exception type
            print(f"Retraining the tokenizer: {path} is unreadable ({str(e).splitlines()[0]})", flush=True)
    tok = train_bpe(texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    tmp.replace(path)  # atomic: a reader never sees half a file
    return tok, False


def sample(parts: Iterable[list[str]], size: int, seed: int = 0) -> list[str]:
    """A uniform sample of `size` texts from a stream of lists of them (reservoir sampling:
    the k-th text replaces a random slot with probability size / k), or all when fewer."""
    rng, kept, seen = np.random.default_rng(seed), [], 0
    for texts in parts:
        fill = max(0, min(len(texts), size - len(kept)))
        kept += texts[:fill]
        later = np.arange(seen + fill, seen + len(texts))
        slots = (rng.random(len(later)) * (later + 1)).astype(np.int64)
        for j in np.flatnonzero(slots < size):
            kept[slots[j]] = texts[fill + j]
        seen += len(texts)
    return kept
