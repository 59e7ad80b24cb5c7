"""The `Captioner`: photos in, sentences out. The one API the CLI, the app and notebooks use."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from captioner.bundle import Bundle, BundleError, load_bundle
from captioner.decoding import DecodeOptions, Decoder, Hypothesis
from captioner.encoder import ImageEncoder
from captioner.features import FeatureCache, iter_features
from captioner.images import ImageError, ImageSource, describe_source

DEFAULT_MODEL = Path(__file__).parent / "assets" / "models" / "default"


@dataclass
class CaptionResult:
    """The caption of one photo, or why there is none."""

    source: str
    caption: str | None = None
    log_prob: float | None = None
    beams: list[tuple[str, float]] = field(default_factory=list)  # top hypotheses with log-probabilities
    error: str | None = None  # why the photo could not be captioned

    @property
    def ok(self) -> bool:
        return self.error is None


def default_model_path() -> Path:
    """The shipped model, unless `$CAPTIONER_MODEL` names another bundle."""
    return Path(os.environ.get("CAPTIONER_MODEL", DEFAULT_MODEL))


class Captioner:
    """A trained decoder bundle plus the image encoder it was trained with."""

    def __init__(self, bundle: Bundle, encoder: ImageEncoder, cache_dir: str | Path | None = None):
        identity = encoder.describe()
        expected = bundle.encoder
        # Any difference (weights, or a feature size the decoder cannot take) would give nonsense captions.
        wrong = [f"{key} {identity[key]} instead of {expected.get(key)}"
                 for key in identity if identity[key] != expected.get(key)]
        if wrong:
            raise BundleError(f"model was trained on encoder {expected['name']} ({expected['weights_id'][:20]}) "
                              f"but got one with {', '.join(wrong)}; captions would be nonsense")
        self.bundle, self.encoder = bundle, encoder
        self.decoder = Decoder(bundle.model, bundle.vocab)
        # Features are cached by photo content, so re-captioning with new settings re-encodes nothing.
        self.cache = FeatureCache(identity, cache_dir)

    @classmethod
    def load(cls, model: str | Path | None = None, encoder_weights: str = "default",
             cache_dir: str | Path | None = None) -> Captioner:
        """Load a bundle (default: the shipped model) and build its encoder."""
        bundle = load_bundle(model or default_model_path())
        encoder = ImageEncoder(bundle.encoder["name"], weights=encoder_weights)
        return cls(bundle, encoder, cache_dir)

    def options(self, **overrides) -> DecodeOptions:
        """Decoding options: the bundle's defaults, with `overrides` (None means keep)."""
        settings = {"max_len": self.bundle.max_len, **self.bundle.decoding}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return DecodeOptions(**settings)

    def caption(self, images: ImageSource | Sequence[ImageSource], **options) -> CaptionResult | list[CaptionResult]:
        """Caption one photo (returns a result; raises `ImageError` if unusable) or a list of them
        (returns a result per photo, failures included). Sources: paths, PIL images, RGB arrays.

        Options: method ("beam", "greedy", "sample"), beam_size, max_len, length_penalty,
        temperature, seed, num_results (top beams to keep), batch_size.
        """
        single = not isinstance(images, (list, tuple))
        results = list(self.iter_captions([images] if single else images, **options))
        if single:
            if results[0].error:
                raise ImageError(results[0].source, results[0].error)
            return results[0]
        return results

    def iter_captions(self, images: Sequence[ImageSource], batch_size: int = 32, **options) -> Iterator[CaptionResult]:
        """Stream results in input order, a batch at a time (for large folders)."""
        opts = self.options(**options)
        for batch in iter_features(images, self.encoder, self.cache, batch_size):
            hyps = dict(zip(batch.indices, self.decode_features(batch.features, opts)))
            errors = dict(batch.errors)
            for i in sorted([*hyps, *errors]):
                name = describe_source(images[i])
                yield CaptionResult(name, error=errors[i].reason) if i in errors else self._result(name, hyps[i])

    def decode_features(self, features: np.ndarray, options: DecodeOptions | None = None) -> list[list[Hypothesis]]:
        """Decode precomputed encoder features [N, D] (evaluation works on cached features)."""
        return self.decoder(features, options or self.options())

    def _result(self, source: str, hyps: list[Hypothesis]) -> CaptionResult:
        text = self.bundle.vocab.decode
        return CaptionResult(source, text(hyps[0].ids), hyps[0].log_prob, [(text(h.ids), h.log_prob) for h in hyps])
