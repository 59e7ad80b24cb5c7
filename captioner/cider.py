"""CIDEr-D (Vedantam et al. 2015) with document frequencies fixed once, from a reference corpus.

pycocoevalcap's scorer recomputes the document frequencies from whatever corpus it is given and
re-vectorises every reference on every call: right for scoring a test split once, far too slow
as the reward of self-critical training, which scores hundreds of sampled captions per step
against the same training references. `CiderD` counts the frequencies and vectorises each
image's references once; scoring a caption is then a few dictionary lookups per n-gram.

Given the same corpus it reproduces pycocoevalcap's `Cider` exactly (tests/test_cider.py),
including two of its conventions: the length penalty compares bigram counts, and an n-gram
unseen in the corpus gets the largest weight, log(number of images).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

Ngram = tuple[str, ...]
Vector = tuple[list[dict[Ngram, float]], list[float], int]  # tf-idf per order, norms, length


def ngram_counts(words: Sequence[str], n: int = 4) -> Counter:
    """How often each 1..n-gram occurs in `words`."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D of captions against image references, with document frequencies taken from
    `corpus` (one list of tokenised references per image: e.g. every training image's).

    `score(words, image)` scores a tokenised caption against the references of corpus image
    `image`; `score_against` takes references that are not in the corpus (dev or test images).
    """

    def __init__(self, corpus: Sequence[Sequence[Sequence[str]]], n: int = 4, sigma: float = 6.0):
        if not corpus:
            raise ValueError("CIDEr-D needs a non-empty reference corpus")
        self.n, self.sigma = n, sigma
        self.document_frequency: Counter = Counter()
        for refs in corpus:
            self.document_frequency.update({g for ref in refs for g in ngram_counts(ref, n)})
        self.log_images = math.log(float(len(corpus)))
        self._refs = [[self._vector(ngram_counts(r, n)) for r in refs] for refs in corpus]

    def _vector(self, counts: Counter) -> Vector:
        vec: list[dict[Ngram, float]] = [{} for _ in range(self.n)]
        norm, length = [0.0] * self.n, 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            w = tf * (self.log_images - math.log(max(1.0, self.document_frequency.get(gram, 0))))
            vec[k][gram] = w
            norm[k] += w * w
            if k == 1:  # pycocoevalcap's length: the number of bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _score(self, hyp: Vector, refs: list[Vector]) -> float:
        vec, norm, length = hyp
        total = 0.0
        for ref_vec, ref_norm, ref_length in refs:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma**2))
            for k in range(self.n):
                ref_k = ref_vec[k]
                # "-D": a hypothesis n-gram counts at most as often as the reference has it
                val = sum(min(w, ref_k.get(g, 0.0)) * ref_k.get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and ref_norm[k] != 0:
                    val /= norm[k] * ref_norm[k]
                total += val * penalty
        return 10.0 * total / self.n / len(refs)

    def score(self, words: Sequence[str], image: int) -> float:
        """CIDEr-D of one tokenised caption against corpus image `image`'s references."""
        return self._score(self._vector(ngram_counts(words, self.n)), self._refs[image])

    def score_against(self, words: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """CIDEr-D of one tokenised caption against references given here (corpus frequencies)."""
        refs = [self._vector(ngram_counts(r, self.n)) for r in references]
        return self._score(self._vector(ngram_counts(words, self.n)), refs)

    def scores(self, captions: Sequence[Sequence[str]], images: Sequence[int]) -> np.ndarray:
        """`score` for each (caption, image) pair, as float32: the rewards of a training batch."""
        return np.array([self.score(w, int(i)) for w, i in zip(captions, images)], np.float32)


def corpus_cider(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]) -> float:
    """Mean CIDEr-D of tokenised `hypotheses[i]` against `references[i]`, frequencies from
    `references` itself: the figure pycocoevalcap reports for the same inputs."""
    scorer = CiderD(references)
    return float(np.mean([scorer.score(h, i) for i, h in enumerate(hypotheses)]))
