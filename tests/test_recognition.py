"""What the encoder recognises: its ImageNet head, read from the shipped weights file and run in
NumPy on the pooled feature, gives the network's own labels, on either runtime."""
from pathlib import Path

import numpy as np
import pytest
from helpers import caption_on_litert_in_a_new_process

from captioner.encoder import ImageEncoder
from captioner.images import load_image
from captioner.recognition import ImageNetHead

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {p.stem: p for p in sorted((ROOT / "data" / "examples").glob("*.jpg"))}
CATS = {"tabby", "tiger cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def lite0() -> ImageEncoder:
    return ImageEncoder()


def test_the_head_on_pooled_features_is_the_networks_own_classifier(lite0):
    """The pooled vector the decoder reads is exactly the input of the network's softmax layer."""
    head = ImageNetHead.for_encoder(lite0.describe())
    assert head is not None and head.kernel.shape == (1280, 1000)
    photos = np.stack([load_image(p, lite0.image_size) for p in EXAMPLES.values()])
    np.testing.assert_allclose(head.probabilities(lite0(photos)), lite0.classify(photos), atol=1e-5)
    labels = dict(zip(EXAMPLES, head.top(lite0(photos))))
    assert labels["coffee"][0][0] == "espresso" and labels["coffee"][0][1] > 0.8
    assert labels["chelsea"][0][0] in CATS and {name for name, _ in labels["chelsea"]} >= CATS
    assert all(len(top) == 5 and top[0][1] >= top[-1][1] for top in labels.values())


@pytest.mark.parametrize("identity", [
    {"name": "tiny", "weights_id": "random:seed=0", "feature_dim": 64},  # no weights file, no head
    {"name": "efficientnet-lite0", "weights_id": "sha256:" + "0" * 64, "feature_dim": 1280},  # other weights
    {"name": "resnet50", "weights_id": "sha256:" + "1" * 64, "feature_dim": 2048},  # keras.applications, no file
])
def test_no_labels_without_the_very_weights_file(identity):
    assert ImageNetHead.for_encoder(identity) is None


def test_the_shipped_model_on_litert_gives_labels_without_tensorflow():
    [label], heavy, _ = caption_on_litert_in_a_new_process(None, EXAMPLES["coffee"], "result.labels[0][0]")
    assert label == "espresso" and heavy == []
