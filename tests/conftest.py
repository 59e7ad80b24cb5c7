"""Shared fixtures: everything is generated here, offline; nothing reads Flickr8k."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """The generated shapes dataset (Karpathy layout), 300 photos."""
    from captioner.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_images=300, seed=0)


@pytest.fixture(scope="session")
def shapes(shapes_root):
    from captioner.data import load_dataset

    return load_dataset(shapes_root)


@pytest.fixture(scope="session")
def tiny_encoder():
    from captioner.encoder import ImageEncoder

    return ImageEncoder("tiny")


@pytest.fixture(scope="session")
def trained_run(shapes, tiny_encoder, tmp_path_factory):
    """A tiny model trained on the generated train split (shared by the slower tests)."""
    from captioner.training import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    bundle = train(shapes, tiny_encoder, out, TrainConfig.preset("tiny"), cache_dir=out / "cache", verbose=0)
    return out, bundle


@pytest.fixture(scope="session")
def attend_run(shapes, tiny_encoder, tmp_path_factory):
    """A tiny Show, Attend and Tell model trained on the generated train split (attention maps)."""
    from captioner.training import TrainConfig, train

    out = tmp_path_factory.mktemp("attend")
    # Best epoch by dev loss: steadier than the BLEU of 30 dev photos, and no decoding per epoch.
    config = TrainConfig.preset("tiny", model_type="show-attend-tell", attention_dim=64, epochs=20, monitor="loss")
    return out, train(shapes, tiny_encoder, out, config, cache_dir=out / "cache", verbose=0)


@pytest.fixture(scope="session")
def trained_captioner(trained_run, tiny_encoder):
    from captioner.captioner import Captioner

    return Captioner(trained_run[1], tiny_encoder)
