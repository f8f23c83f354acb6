"""A generated translation task whose tokens differ in difficulty.

The source language has grammatical gender, number agreement and verb-final subordinate
clauses; the target language has none of these. So most target words are a word-for-word
lookup, while some need:
- agreement: the target verb's ending follows the subject's number, words away;
- reordering: subordinate clauses move the verb from the end to after the subject;
- context: some verbs translate one way with a living object and another way otherwise;
- many-to-one mappings: gendered determiners and adjective endings collapse.

Everything comes from one seed, so every machine generates the same corpus.
"""

import random

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
DEF = ("der", "die", "das")
INDEF = ("ein", "eine", "ein")
ADJ_SUFFIX = ("er", "e", "es")


class Lexicon:
    def __init__(self, rng: random.Random, nouns=60, verbs=30, adjectives=24, adverbs=10, polysemous=8):
        used = set(DEF + INDEF + ("dass", "nicht", "und"))

        def word(syllables: int, alphabet: str = CONSONANTS) -> str:
            while True:
                w = "".join(rng.choice(alphabet) + rng.choice(VOWELS) for _ in range(syllables))
                if w not in used:
                    used.add(w)
                    return w

        def pairs(n, syllables):
            return [(word(syllables), word(syllables, "hjklmnpqrstwy")) for _ in range(n)]

        self.nouns = [
            (s, t, rng.randrange(3), rng.random() < 0.5) for s, t in pairs(nouns, 2)
        ]  # (src, tgt, gender, animate)
        self.verbs = pairs(verbs, 2)
        # A polysemous verb translates to its own word with living objects, to another otherwise.
        self.other_sense = {s: word(3, "hjklmnpqrstwy") for s, _ in self.verbs[:polysemous]}
        self.adjectives = pairs(adjectives, 2)
        self.adverbs = pairs(adverbs, 3)


def _noun_phrase(rng: random.Random, lex: Lexicon):
    src_noun, tgt_noun, gender, animate = rng.choice(lex.nouns)
    plural = rng.random() < 0.35
    definite = plural or rng.random() < 0.6
    src, tgt = [], []
    src.append("die" if plural and definite else (DEF if definite else INDEF)[gender])
    tgt.append("the" if definite else "a")
    if rng.random() < 0.4:
        a_src, a_tgt = rng.choice(lex.adjectives)
        src.append(a_src + ("en" if plural else ADJ_SUFFIX[gender]))
        tgt.append(a_tgt)
    src.append(src_noun + ("en" if plural else ""))
    tgt.append(tgt_noun + ("s" if plural else ""))
    return src, tgt, plural, animate


def _verb(rng: random.Random, lex: Lexicon, subject_plural: bool, object_animate: bool):
    src, tgt = rng.choice(lex.verbs)
    if not object_animate and src in lex.other_sense:
        tgt = lex.other_sense[src]
    return src + ("en" if subject_plural else "t"), tgt + ("" if subject_plural else "s")


def _clause(rng: random.Random, lex: Lexicon, subordinate: bool):
    subj_s, subj_t, plural, _ = _noun_phrase(rng, lex)
    obj_s, obj_t, _, animate = _noun_phrase(rng, lex)
    verb_s, verb_t = _verb(rng, lex, plural, animate)
    negate = rng.random() < 0.2
    if subordinate:  # verb-final in the source, verb-second in the target
        src = subj_s + obj_s + (["nicht"] if negate else []) + [verb_s]
    else:
        src = subj_s + [verb_s] + (["nicht"] if negate else []) + obj_s
    tgt = subj_t + (["not"] if negate else []) + [verb_t] + obj_t
    if rng.random() < 0.3:
        adv_s, adv_t = rng.choice(lex.adverbs)
        src, tgt = src + [adv_s], tgt + [adv_t]
    return src, tgt


def generate(num_samples: int, seed: int = 0, lexicon_seed: int = 1234) -> tuple[list[str], list[str]]:
    """`num_samples` (source, target) sentence pairs. The lexicon depends on `lexicon_seed` only,
    so different splits (different `seed`) share one language."""
    lex = Lexicon(random.Random(lexicon_seed))
    rng = random.Random(seed)
    sources, targets = [], []
    for _ in range(num_samples):
        src, tgt = _clause(rng, lex, subordinate=False)
        r = rng.random()
        if r < 0.35:
            s, t = _clause(rng, lex, subordinate=True)
            src, tgt = src + [",", "dass"] + s, tgt + [",", "that"] + t
        elif r < 0.5:
            s, t = _clause(rng, lex, subordinate=False)
            src, tgt = src + ["und"] + s, tgt + ["and"] + t
        sources.append(" ".join(src) + " .")
        targets.append(" ".join(tgt) + " .")
    return sources, targets


def sentiment(num_samples: int, seed: int = 0, lexicon_seed: int = 1234) -> tuple[list[str], list[int]]:
    """Sentences of the source language with a sentiment label (1 positive, 0 negative).

    Half carry one decisive polar word; a quarter negate it (`nicht` flips the label); a
    quarter contrast two clauses (`aber`: the second clause's word decides).
    """
    lex = Lexicon(random.Random(lexicon_seed))
    polar_rng = random.Random(lexicon_seed + 1)
    words = ["".join(polar_rng.choice(CONSONANTS) + polar_rng.choice(VOWELS) for _ in range(3)) for _ in range(16)]
    positive, negative = words[:8], words[8:]
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(num_samples):
        label = rng.random() < 0.5
        clause = _clause(rng, lex, subordinate=False)[0]
        kind = rng.random()
        if kind < 0.5:
            body = clause + [rng.choice(positive if label else negative)]
        elif kind < 0.75:
            body = clause + ["nicht", rng.choice(negative if label else positive)]
        else:
            first = rng.choice(negative if label else positive)
            second = _clause(rng, lex, subordinate=False)[0]
            body = [first] + clause + [",", "aber"] + second + [rng.choice(positive if label else negative)]
        texts.append(" ".join(body) + " .")
        labels.append(int(label))
    return texts, labels
