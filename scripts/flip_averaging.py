"""Does test-time flip averaging help? Score a bundle on the dev split with each photo's feature,
and with the mean of it and its mirror image's feature (never on test).

    python scripts/flip_averaging.py [--model DIR]

Runs on the TensorFlow runtime (float features, from the feature cache where present); the mirror
images are encoded here. Prints both rows of scores; this is an experiment, not a product option.
"""
from __future__ import annotations

import argparse

import numpy as np

from captioner import paths
from captioner.captioner import Captioner
from captioner.data import load_dataset
from captioner.decoding import caption_texts
from captioner.evaluation import bleu_scores, coco_scores
from captioner.features import encode_photos
from captioner.images import load_image


def main() -> None:
    """Print the dev scores of both kinds of features."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="bundle (default: the shipped model)")
    parser.add_argument("--data", help="dataset folder (default: $CAPTIONER_DATA or data/flickr8k)")
    args = parser.parse_args()

    captioner = Captioner.load(args.model, cache_dir=paths.feature_cache_dir(), runtime="tf")
    if captioner.grid_shape is not None:  # a mirrored map's regions are mirrored too: means would mix them
        raise SystemExit(f"{args.model}: attends over regions; flip averaging here is for pooled-feature models")
    dataset = load_dataset(args.data or paths.default_data())
    encoder = captioner.feature_encoder
    ids, plain, _ = encode_photos(dataset.images, dataset.subset("dev").splits["dev"], encoder, captioner.cache)
    mirrored = np.concatenate([
        encoder(np.stack([load_image(dataset.images[i], encoder.image_size)[:, ::-1] for i in ids[start : start + 32]]))
        for start in range(0, len(ids), 32)])
    refs = [dataset.captions[i] for i in ids]
    for name, features in (("photo", plain), ("mean of photo and mirror", (plain + mirrored) / 2)):
        hyps = caption_texts(captioner.step_model, captioner.bundle.vocab, features, captioner.options)
        scores = {**bleu_scores(refs, hyps), **coco_scores(dict(zip(ids, refs)), dict(zip(ids, hyps)))}
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if not k.startswith("coco")),
              f"({len(set(hyps))} distinct captions)")


if __name__ == "__main__":
    main()
