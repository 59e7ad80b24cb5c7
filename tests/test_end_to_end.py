"""Train a small model on generated photos and check that it really learned to caption."""
from dataclasses import replace

import pytest

from captioner.bundle import Bundle
from captioner.captioner import Captioner
from captioner.evaluation import evaluate
from captioner.model import ShowAndTell

pytestmark = pytest.mark.slow


def test_trained_model_beats_an_untrained_one_on_held_out_photos(shapes, trained_run, tiny_encoder):
    run_dir, bundle = trained_run
    trained = Captioner(bundle, tiny_encoder)
    untrained_model = ShowAndTell(len(bundle.vocab), tiny_encoder.feature_dim, **{
        k: bundle.model.get_config()[k] for k in ("embed_dim", "units", "num_layers", "dropout", "rnn")})
    untrained = Captioner(Bundle(untrained_model, bundle.vocab, bundle.encoder, bundle.decoding), tiny_encoder)

    scores = {}
    for name, captioner in [("trained", trained), ("untrained", untrained)]:
        for method in ("greedy", "beam"):
            report = evaluate(captioner, shapes, "test", replace(captioner.options, method=method, beam_size=3),
                              coco=False, progress=False)
            assert report["images"] == len(shapes.splits["test"]) > 0
            scores[name, method] = report["scores"]["BLEU-4"]
    # Held-out photos never seen in training: a learned model is far above chance.
    assert scores["trained", "greedy"] > 30, scores
    assert scores["trained", "beam"] > 30, scores
    assert scores["untrained", "greedy"] < 5 and scores["untrained", "beam"] < 5, scores

    history = (run_dir / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch") and len(history) > 3
    assert (run_dir / "model" / "config.json").exists() and not (run_dir / "backup").exists()


def test_reloaded_bundle_gives_identical_captions(trained_run, tiny_encoder, shapes):
    run_dir, bundle = trained_run
    photos = [shapes.images[i] for i in shapes.splits["dev"][:8]]
    first = Captioner(bundle, tiny_encoder).caption(photos, beam_size=3)
    again = Captioner.load(run_dir / "model", cache_dir=None).caption(photos, beam_size=3)
    assert [(r.caption, round(r.log_prob, 4)) for r in first] == [(r.caption, round(r.log_prob, 4)) for r in again]
