"""The fast CIDEr-D against pycocoevalcap's scorer, and what a reward needs of it."""
from __future__ import annotations

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from captioner.cider import CiderD, corpus_cider

WORDS = "a dog man woman runs jumps on the grass in water red blue ball with two".split()


def corpus(seed: int, images: int = 60) -> tuple[list[list[list[str]]], list[list[str]]]:
    """Random references (5 per image, 1-14 words) and one random hypothesis per image, some empty."""
    rng = np.random.default_rng(seed)

    def sentence(low: int) -> list[str]:
        return list(rng.choice(WORDS, size=rng.integers(low, 15)))

    refs = [[sentence(1) for _ in range(5)] for _ in range(images)]
    hyps = [sentence(0) for _ in range(images)]
    return refs, hyps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocoevalcap_per_image(seed):
    refs, hyps = corpus(seed)
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    mean, per_image = Cider().compute_score(gts, res)
    scorer = CiderD(refs)
    ours = [scorer.score(h, i) for i, h in enumerate(hyps)]
    np.testing.assert_allclose(ours, per_image, rtol=0, atol=1e-6)
    assert corpus_cider(refs, hyps) == pytest.approx(mean, abs=1e-6)


def test_references_outside_the_corpus_use_its_frequencies():
    refs, hyps = corpus(3)
    scorer = CiderD(refs)
    assert scorer.score_against(hyps[4], refs[4]) == pytest.approx(scorer.score(hyps[4], 4), abs=1e-12)


def test_reward_ranks_a_reference_above_a_wrong_caption():
    refs = [[["a", "dog", "runs", "on", "the", "grass"], ["a", "brown", "dog", "runs"]],
            [["a", "man", "rides", "a", "bike"], ["a", "man", "on", "a", "bicycle"]]]
    scorer = CiderD(refs)
    rewards = scorer.scores([["a", "dog", "runs", "on", "the", "grass"], ["a", "man", "rides", "a", "bike"],
                             ["a", "man", "rides", "a", "bike"], []], [0, 1, 0, 1])
    assert rewards.dtype == np.float32
    assert rewards[0] > rewards[2] and rewards[1] > rewards[2]
    assert rewards[3] == 0.0


def test_empty_corpus_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        CiderD([])
