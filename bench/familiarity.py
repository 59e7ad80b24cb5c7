"""The shipped model's familiarity score and ImageNet labels, measured on Flickr8k and other photos.

Reads the pooled features of the train and dev photos from the feature cache (encoding those
missing), then reports: the share of dev photos passing the shipped threshold with the float
encoder (what it was calibrated on) and with the int8 LiteRT encoder (the default runtime); the
share of dev photos 501-1000 passing a threshold calibrated on photos 1-500 only; and the scores
and top labels of the example photos and of scikit-image's pictures, each with the share of dev
photos that score lower.

    python bench/familiarity.py        # Flickr8k from $CAPTIONER_DATA or data/flickr8k
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import REPO, machine_info, print_table, write_result

from captioner import paths
from captioner.bundle import load_bundle
from captioner.data import load_dataset
from captioner.encoder import ImageEncoder
from captioner.familiarity import build
from captioner.features import FeatureCache, encode_photos
from captioner.recognition import ImageNetHead
from captioner.runtime_litert import LiteRTEncoder

# scikit-image's pictures: photos and images of things Flickr8k does not show, and two that it does
SKIMAGE = ("astronaut", "camera", "chelsea", "coffee", "rocket", "horse", "hubble_deep_field",
           "immunohistochemistry", "retina", "moon", "page", "text", "brick", "gravel", "colorwheel", "logo",
           "coins", "clock")


def skimage_photos(size: int) -> dict[str, np.ndarray]:
    """scikit-image's pictures as RGB uint8, squashed to size x size as the loader does."""
    import skimage.data
    from PIL import Image

    out = {}
    for name in SKIMAGE:
        image = np.asarray(getattr(skimage.data, name)())
        image = image.astype(np.uint8) * 255 if image.dtype == bool else image.astype(np.uint8)
        image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
        out[name] = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", metavar="FILE", help="result JSON (default bench/results/familiarity.json)")
    args = p.parse_args(argv)

    bundle = load_bundle(paths.SHIPPED_MODEL, load_decoder=False)
    familiarity, dataset = bundle.familiarity, load_dataset(paths.default_data())
    encoder = ImageEncoder(bundle.encoder["name"])
    cache = FeatureCache(encoder.describe(), paths.feature_cache_dir())
    train, dev = (encode_photos(dataset.images, dataset.splits[s], encoder, cache, progress=False)[1]
                  for s in ("train", "dev"))
    dev_scores = familiarity.scores(dev)
    int8 = LiteRTEncoder(bundle, int8=True)
    int8_dev = encode_photos(dataset.images, dataset.splits["dev"], int8, progress=False)[1]
    half = build(train, dev[:500])

    head = ImageNetHead.for_encoder(bundle.encoder)
    photos = skimage_photos(encoder.image_size)
    features = encoder(np.stack(list(photos.values())))
    rows = [{"photo": name, "score": round(float(score), 3),
             "dev photos lower": f"{(dev_scores < score).mean():.1%}",
             "verdict": "unfamiliar" if score < familiarity.threshold else "familiar",
             "top labels": ", ".join(f"{label} {p:.0%}" for label, p in labels[:2])}
            for name, score, labels in zip(photos, familiarity.scores(features), head.top(features))]
    figures = {
        "threshold": familiarity.threshold,
        "dev_pass_float": float((dev_scores >= familiarity.threshold).mean()),
        "dev_pass_int8": float((familiarity.scores(int8_dev) >= familiarity.threshold).mean()),
        "held_out_half_pass": float((half.scores(dev[500:]) >= half.threshold).mean()),
        "dev_scores": {"min": float(dev_scores.min()), "median": float(np.median(dev_scores)),
                       "max": float(dev_scores.max())},
    }
    print_table([{k: v for k, v in figures.items() if k != "dev_scores"}], title="Flickr8k dev")
    print_table(rows, title="scikit-image pictures")
    write_result("familiarity", {"machine": machine_info(), "bundle": str(Path(paths.SHIPPED_MODEL).relative_to(REPO)),
                                 **figures, "photos": rows}, args.output)


if __name__ == "__main__":
    main()
