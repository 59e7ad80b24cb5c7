import json
import math

import pytest

from captioner.evaluation import bleu_scores, coco_scores


def test_bleu_hand_computed():
    # hypothesis "the cat sat on the mat" (6 tokens), reference "the cat is on the mat" (6 tokens)
    # unigram matches 5/6, bigrams: the-cat, on-the, the-mat = 3/5; trigrams on-the-mat = 1/4; 4-grams 0/3
    refs = [["The cat is on the mat."]]
    hyps = ["the cat sat on the mat"]
    scores = bleu_scores(refs, hyps)
    assert scores["BLEU-1"] == pytest.approx(100 * 5 / 6)
    assert scores["BLEU-2"] == pytest.approx(100 * math.sqrt(5 / 6 * 3 / 5))
    assert scores["BLEU-3"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert scores["BLEU-4"] == pytest.approx(0.0, abs=1e-9)  # no smoothing at corpus level


def test_bleu_brevity_penalty_and_multiple_references():
    refs = [["a dog runs on the green grass", "a dog runs"]]
    # closest reference length is 3 = hypothesis length: no penalty, all n-grams match
    assert bleu_scores(refs, ["a dog runs"])["BLEU-3"] == pytest.approx(100.0)
    short = bleu_scores([["a dog runs on the green grass"]], ["a dog runs"])
    assert short["BLEU-1"] == pytest.approx(100 * math.exp(1 - 7 / 3))


def test_nltk_and_pycocoevalcap_agree():
    refs = {
        "1": ["a black dog runs across the grass", "a dog is running on a lawn", "the black dog runs"],
        "2": ["a man rides a red bike down the street", "a cyclist on a city road", "man riding a bicycle"],
        "3": ["two children play in the sand at the beach", "kids playing on a beach", "two kids dig in sand"],
    }
    hyps = {"1": "a black dog is running on the grass", "2": "a man rides a bike on the street",
            "3": "two children are playing on the beach"}
    nltk = bleu_scores(list(refs.values()), list(hyps.values()))
    coco = coco_scores(refs, hyps, meteor=False)
    # Both are corpus BLEU with the closest reference length; they differ only in tie-breaking
    # of equally close references and float details: within 0.5 BLEU point here.
    for n in range(1, 5):
        assert nltk[f"BLEU-{n}"] == pytest.approx(coco[f"coco BLEU-{n}"], abs=0.5)
    assert coco["CIDEr"] > 0 and 0 < coco["ROUGE-L"] <= 100


def test_mismatched_lengths():
    with pytest.raises(ValueError):
        bleu_scores([["a"]], [])


def test_report_describes_the_captions_it_scored(trained_captioner, shapes, tmp_path):
    from captioner.evaluation import evaluate

    report = evaluate(trained_captioner, shapes, "dev", coco=False, output=tmp_path, progress=False)
    hyps = [json.loads(line)["hypothesis"] for line in (tmp_path / "per_image.jsonl").read_text().splitlines()]
    assert len(hyps) == report["images"]
    assert report["captions"]["distinct"] == len(set(hyps)) > 1
    assert report["captions"]["mean_words"] == round(sum(len(h.split()) for h in hyps) / len(hyps), 2) > 3
