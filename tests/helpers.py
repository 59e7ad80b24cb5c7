"""Small stand-ins shared by several test modules (imported as `helpers`: pytest puts tests/ on the path)."""
from __future__ import annotations

import numpy as np

IDENTITY = {"name": "flat", "weights_id": "mean-colour", "image_size": 8, "feature_dim": 3}


class CountingEncoder:
    """Mean colour as the feature; remembers how many photos it encoded."""

    image_size, feature_dim = 8, 3

    def __init__(self):
        self.encoded = 0

    def __call__(self, images):
        self.encoded += len(images)
        return np.asarray(images, np.float32).mean(axis=(1, 2))

    def describe(self):
        return IDENTITY
