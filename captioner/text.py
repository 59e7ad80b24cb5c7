"""Caption text: one normalisation for training and evaluation, and the vocabulary."""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from captioner.fileio import atomic_write_text

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)  # PAD must be id 0: Embedding(mask_zero=True) masks it

_NON_WORD = re.compile(r"[^a-z0-9' ]+")


def normalize(caption: str) -> str:
    """Lowercase, strip punctuation, collapse whitespace ("A dog's ball!" -> "a dog's ball")."""
    text = _NON_WORD.sub(" ", caption.lower().replace("\u2019", "'"))
    words = [w.strip("'") for w in text.split()]
    return " ".join(w for w in words if w)


def tokenize(caption: str) -> list[str]:
    """Word tokens of the normalised caption: what training sees and BLEU scores."""
    return normalize(caption).split()


class Vocabulary:
    """Bidirectional word <-> id map with the four special tokens at ids 0..3."""

    def __init__(self, words: Sequence[str]):
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate words")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls([*SPECIAL_TOKENS, *(w for w in kept if w not in SPECIAL_TOKENS)])

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def encode(self, caption: str, max_len: int | None = None) -> list[int]:
        """`<start> w1..wn <end>` as ids; words beyond `max_len` are cut (the `<end>` is kept)."""
        ids = [self.index.get(w, self.unk_id) for w in tokenize(caption)]
        if max_len is not None:
            ids = ids[:max_len]
        return [self.start_id, *ids, self.end_id]

    @classmethod
    def banned_logits(cls, vocab_size: int, fill: float = -float("inf")) -> np.ndarray:
        """[vocab_size] zeros with `fill` at the tokens no caption may contain (`<pad>`, `<start>`,
        `<unk>`): added to logits, they keep decoding and sampling from ever choosing them."""
        banned = np.zeros(vocab_size, np.float32)
        banned[[cls.pad_id, cls.start_id, cls.unk_id]] = fill
        return banned

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to a sentence, stopping at `<end>` and dropping `<start>`/`<pad>`."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            out.append(self.words[i] if 0 <= i < len(self.words) else UNK)
        return " ".join(out)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps({"words": self.words}, ensure_ascii=False, indent=0))

    @classmethod
    def from_json(cls, data: object) -> Vocabulary:
        """The vocabulary in a parsed `vocab.json`; ValueError saying what is wrong."""
        words = data.get("words") if isinstance(data, dict) else None
        if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
            raise ValueError("'words' must be a list of non-empty strings")
        return cls(words)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a valid vocabulary file ({e})") from None
