"""Scoring captions: corpus BLEU-1..4 (nltk) and the COCO caption metrics (pycocoevalcap).

Hypotheses are free-running captions; both sides are normalised and tokenised by
`captioner.text.tokenize`, so special tokens and punctuation never reach a metric.
"""
from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from nltk.translate.bleu_score import corpus_bleu

from captioner.decoding import DecodeOptions, caption_texts
from captioner.fileio import atomic_write_text
from captioner.text import tokenize

log = logging.getLogger(__name__)

# Cumulative BLEU-n: uniform weights over 1..n-grams, each set summing to 1.
BLEU_WEIGHTS = [tuple([1.0 / n] * n + [0.0] * (4 - n)) for n in range(1, 5)]


def bleu_scores(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus-level BLEU-1..4 (in percent) of `hypotheses[i]` against all of `references[i]`.

    No smoothing: at corpus level every n-gram order has matches on any sensible output, and
    smoothing would make the numbers incomparable with published ones.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets for {len(hypotheses)} hypotheses")
    if not hypotheses:
        raise ValueError("no captions to score")
    refs = [[tokenize(r) for r in rs] for rs in references]
    hyps = [tokenize(h) for h in hypotheses]
    with warnings.catch_warnings():  # nltk warns when an order has no match; a 0 score says it
        warnings.simplefilter("ignore", UserWarning)
        scores = corpus_bleu(refs, hyps, weights=BLEU_WEIGHTS)
    return {f"BLEU-{n}": 100.0 * float(s) for n, s in enumerate(scores, start=1)}


def coco_scores(
    references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str], meteor: bool = True
) -> dict[str, float]:
    """pycocoevalcap's BLEU-1..4, CIDEr and ROUGE-L (and METEOR when Java runs), in percent.

    Text goes in through `tokenize` instead of the PTB tokenizer (a Java program) so both
    metric families see the same tokens.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = list(hypotheses)
    gts = {k: [" ".join(tokenize(r)) for r in references[k]] for k in keys}
    res = {k: [" ".join(tokenize(hypotheses[k]))] for k in keys}
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"coco BLEU-{n}": 100.0 * b for n, b in enumerate(bleu, start=1)})
    out["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])
    out["ROUGE-L"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
    if meteor and shutil.which("java"):
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            out["METEOR"] = 100.0 * float(Meteor().compute_score(gts, res)[0])
        except Exception as e:  # noqa: BLE001 - METEOR is optional; say why it is missing
            log.warning("METEOR skipped: %s", e)
    return out


def evaluate(captioner, dataset, split: str = "dev", options: DecodeOptions | None = None,
             limit: int | None = None, coco: bool = True, output: str | Path | None = None,
             progress: bool = True) -> dict:
    """Caption a split free-running and score it against every reference of each image.

    `options` default to the model's own. Returns a report (split, decoding settings, scores);
    with `output`, also writes `report.json` and `per_image.jsonl` (hypothesis and references
    per image) there.
    """
    from captioner.features import encode_photos

    options = options or captioner.options
    ids = dataset.subset(split).splits[split][:limit]
    ids, features, failures = encode_photos(dataset.images, ids, captioner.feature_encoder, captioner.cache,
                                            progress=progress, description=f"Encoding {split} photos")
    hyps = caption_texts(captioner.step_model, captioner.bundle.vocab, features, options)
    refs = [dataset.captions[i] for i in ids]
    scores = bleu_scores(refs, hyps)
    if coco:
        scores.update(coco_scores(dict(zip(ids, refs)), dict(zip(ids, hyps))))
    beam = options.method == "beam"
    report = {
        "split": split,
        "images": len(ids),
        "skipped_images": [str(f) for f in failures],
        # what decided these captions: greedy and sampling have no beam and no length penalty
        "decoding": {**options.to_dict(), "beam_size": options.beam_size if beam else 1,
                     "length_penalty": options.length_penalty if beam else 0.0},
        "encoder": captioner.encoder.describe(),
        "scores": {k: round(v, 2) for k, v in scores.items()},
        # What a metric hides: training on a reward can lengthen captions or make them alike.
        "captions": {"mean_words": round(sum(len(tokenize(h)) for h in hyps) / len(hyps), 2),
                     "distinct": len(set(hyps))},
    }
    if output is not None:
        output = Path(output)
        atomic_write_text(output / "report.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(output / "per_image.jsonl", "".join(
            json.dumps({"image": i, "hypothesis": h, "references": r}) + "\n" for i, h, r in zip(ids, hyps, refs)))
    return report
