import numpy as np
import pytest
from PIL import Image

from captioner.bundle import BundleError
from captioner.captioner import Captioner
from captioner.encoder import ImageEncoder
from captioner.images import ImageError


def test_caption_accepts_paths_pil_images_and_arrays(trained_captioner, shapes):
    path = shapes.images[shapes.splits["dev"][0]]
    from_path = trained_captioner.caption(path)
    from_pil = trained_captioner.caption(Image.open(path))
    from_array = trained_captioner.caption(np.asarray(Image.open(path).convert("RGB")))
    assert from_path.ok and from_path.caption and from_path.source == str(path)
    assert from_path.caption == from_pil.caption == from_array.caption


def test_a_list_returns_one_result_each_in_order_with_failures(trained_captioner, shapes, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    good = [shapes.images[i] for i in shapes.splits["dev"][:3]]
    results = trained_captioner.caption([good[0], bad, *good[1:]], batch_size=2)
    assert [r.source for r in results] == [str(good[0]), str(bad), *map(str, good[1:])]
    assert [r.ok for r in results] == [True, False, True, True]
    assert "not an image" in results[1].error
    with pytest.raises(ImageError, match="broken.jpg"):
        trained_captioner.caption(bad)


def test_top_beams_and_decoding_options(trained_captioner, shapes):
    path = shapes.images[shapes.splits["dev"][1]]
    result = trained_captioner.caption(path, method="beam", beam_size=4, num_results=3)
    assert len(result.beams) == 3 and (result.beams[0].caption, result.beams[0].log_prob) == (result.caption,
                                                                                               result.log_prob)
    assert [b.score for b in result.beams] == sorted((b.score for b in result.beams), reverse=True)
    assert len({b.caption for b in result.beams}) == 3
    assert all(0 < b.word_probability <= 1 for b in result.beams)
    short = trained_captioner.caption(path, method="sample", seed=0, max_len=2)
    assert len(short.caption.split()) <= 2


def test_recaptioning_does_not_re_encode(trained_run, shapes):
    calls = []

    class CountingEncoder(ImageEncoder):
        def __call__(self, images):
            calls.append(len(images))
            return super().__call__(images)

    captioner = Captioner(trained_run[1], CountingEncoder("tiny"))
    photos = [shapes.images[i] for i in shapes.splits["dev"][:4]]
    captioner.caption(photos, method="beam")
    captioner.caption(photos, method="greedy")
    assert sum(calls) == 4


def test_encoder_mismatch_is_refused(trained_run):
    with pytest.raises(BundleError, match="trained on encoder tiny"):
        Captioner(trained_run[1], ImageEncoder("tiny", seed=1))
