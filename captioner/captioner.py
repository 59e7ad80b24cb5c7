"""The `Captioner`: photos in, sentences out. The one API the CLI, the app and notebooks use."""
from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from threadpoolctl import ThreadpoolController

from captioner import paths
from captioner.bundle import Bundle, BundleError, load_bundle
from captioner.decoding import DecodeOptions, Hypothesis, StepModel, decode, runtime_name
from captioner.ensemble import step_model_for
from captioner.familiarity import pooled
from captioner.features import FeatureCache, GridEncoder, iter_features
from captioner.images import MAX_PIXELS, ImageError, ImageSource, describe_source, load_image
from captioner.recognition import ImageNetHead, Labels

RUNTIMES = ("auto", "litert", "litert-float", "tf")


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


# OpenBLAS has one thread count per process: callers that overlap (the app's sessions) take turns,
# so that each restores the count it found, not one another's limit.
_BLAS_LOCK = threading.Lock()


@dataclass(frozen=True)
class Beam:
    """One candidate sentence with its scores."""

    caption: str
    log_prob: float  # log-probability of the words and the final <end>
    score: float  # what beams are ranked by: log_prob / tokens**length_penalty
    # Attention models: where the model looked for each word, weights over the encoder's map
    # [words, H, W] (each word's sum to 1); None for models without attention.
    attention: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def word_probability(self) -> float:
        """The geometric mean of the per-word probabilities (the end counts as a word): a
        length-fair 0..1 figure of how sure the model was."""
        return math.exp(self.log_prob / (len(self.caption.split()) + 1))


@dataclass(frozen=True)
class CaptionResult:
    """The caption of one photo (and the other beams, best first), or why there is none."""

    source: str
    beams: tuple[Beam, ...] = ()
    error: str | None = None  # why the photo could not be captioned
    # What the encoder recognises: its top ImageNet labels with their probabilities (none for
    # encoders without an ImageNet head), and how close the photo lies to the model's training
    # photos (see captioner.familiarity; None when the bundle has no familiarity data).
    labels: Labels = ()
    familiarity: float | None = None
    familiarity_threshold: float | None = None  # the bundle's: scores below it are unfamiliar

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def unfamiliar(self) -> bool:
        """Whether the photo is less like the training photos than the bundle allows (its caption
        is then likely wrong). False when there is no score."""
        return self.familiarity is not None and self.familiarity < self.familiarity_threshold

    @property
    def caption(self) -> str | None:
        return self.beams[0].caption if self.beams else None

    @property
    def log_prob(self) -> float | None:
        return self.beams[0].log_prob if self.beams else None

    @property
    def attention(self) -> np.ndarray | None:
        """The best beam's attention weights [words, H, W] (attention models only)."""
        return self.beams[0].attention if self.beams else None


class Captioner:
    """A trained decoder bundle (or an ensemble bundle), the image encoder it was trained with,
    and the runtime that runs the decoder (TensorFlow unless another `StepModel` is given).
    `feature_encoder` is what the decoder reads: the encoder's pooled vectors, or its spatial
    maps for an attention model (or an ensemble with one)."""

    def __init__(self, bundle: Bundle, encoder, cache_dir: str | Path | None = None,
                 step_model: StepModel | None = None, cache_items: int = 4096):
        identity = encoder.describe()
        expected = bundle.encoder
        # Any difference (weights, or a feature size the decoder cannot take) would give nonsense captions.
        wrong = [f"{key} {identity[key]} instead of {expected.get(key)}"
                 for key in identity if identity[key] != expected.get(key)]
        if wrong:
            raise BundleError(f"model was trained on encoder {expected['name']} ({expected['weights_id'][:20]}) "
                              f"but got one with {', '.join(wrong)}; captions would be nonsense")
        self.bundle, self.encoder = bundle, encoder
        if step_model is None:
            from captioner.runtime_tf import TensorFlowStep

            step_model = step_model_for(bundle, lambda b: TensorFlowStep(b.model))
        self.step_model = step_model
        self.runtime = runtime_name(step_model)
        self.feature_encoder, self.grid_shape = encoder, None
        if bundle.attends:
            if getattr(encoder, "grid_shape", None) is None:
                raise BundleError(f"{bundle.model_type} needs the encoder's spatial map, which "
                                  f"{type(encoder).__name__} does not give (it has no grid_shape)")
            self.feature_encoder = GridEncoder(encoder)
            self.grid_shape = self.feature_encoder.grid_shape
            regions = bundle.primary.decoder_sizes["regions"]
            if self.feature_encoder.feature_shape[0] != regions:
                raise BundleError(f"model attends over {regions} regions but encoder "
                                  f"{encoder.name} gives {self.grid_shape[0]}x{self.grid_shape[1]}")
        #: the encoder's ImageNet classifier, when its weights file has one (labels in results)
        self.head = ImageNetHead.for_encoder(bundle.encoder)
        # Features are cached by photo content, so re-captioning with new settings re-encodes nothing.
        # `cache_items` bounds the features kept in memory (a server of unique photos wants few).
        self.cache = FeatureCache(identity, cache_dir, memory_items=cache_items, grid_shape=self.grid_shape)

    @classmethod
    def load(cls, model: str | Path | None = None, encoder_weights: str = "default",
             cache_dir: str | Path | None = None, runtime: str = "auto", cache_items: int = 4096) -> Captioner:
        """Load a bundle (a folder or a shipped model's name; default: `$CAPTIONER_MODEL` or the
        shipped model) and its encoder.

        `runtime`: "litert" runs the bundle's .tflite files without importing TensorFlow (with its
        int8 encoder when it has one); "litert-float" the same with the float encoder, whose
        captions are TensorFlow's; "tf" runs the Keras decoder and encoder; "auto" takes "litert"
        when the bundle has its files, the interpreter is installed and the encoder weights are
        the default ones. An ensemble bundle loads the same way, its members on the same runtime.
        """
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        directory = paths.model_dir(model)
        if runtime != "tf":
            from captioner import runtime_litert

            bundle = load_bundle(directory, load_decoder=False)
            usable = bundle.has_litert and runtime_litert.available() and encoder_weights == "default"
            if runtime.startswith("litert") and not usable:
                missing = next((m.directory for m in bundle.members if not m.has_litert), None)
                why = (f"its member {missing} has no LiteRT files (add them to the model it was copied from with "
                       "`captioner export`, then run `captioner ensemble` again)" if missing
                       else "the bundle has no LiteRT files (add them with `captioner export`)" if not bundle.has_litert
                       else "ai-edge-litert is not installed" if not runtime_litert.available()
                       else "other encoder weights need the TensorFlow runtime")
                raise BundleError(f"{directory}: cannot run on LiteRT: {why}")
            if usable:
                step = step_model_for(bundle, runtime_litert.LiteRTStep)
                encoder = runtime_litert.LiteRTEncoder(bundle.primary, int8=runtime != "litert-float")
                return cls(bundle, encoder, cache_dir, step, cache_items)
        from captioner.encoder import ImageEncoder

        bundle = load_bundle(directory)
        return cls(bundle, ImageEncoder(bundle.encoder["name"], weights=encoder_weights), cache_dir,
                   cache_items=cache_items)

    @property
    def options(self) -> DecodeOptions:
        """The bundle's decoding defaults; `caption(..., beam_size=5)` or `dataclasses.replace` change them."""
        return self.bundle.decoding

    def caption(self, images: ImageSource | Sequence[ImageSource], options: DecodeOptions | None = None,
                batch_size: int = 32, **overrides) -> CaptionResult | list[CaptionResult]:
        """Caption one photo (returns a result; raises `ImageError` if unusable) or a list of them
        (returns a result per photo, failures included). Sources: paths, file bytes, PIL images, RGB arrays.

        `options` (default: the model's) with `overrides` of its fields: method ("beam", "greedy",
        "sample"), beam_size, max_len, length_penalty, temperature, seed, num_results.
        """
        single = not isinstance(images, (list, tuple))
        results = list(self.iter_captions([images] if single else images, options, batch_size, **overrides))
        if single:
            if results[0].error:
                raise ImageError(results[0].source, results[0].error)
            return results[0]
        return results

    def iter_captions(self, images: Sequence[ImageSource], options: DecodeOptions | None = None,
                      batch_size: int = 32, max_pixels: int = MAX_PIXELS, **overrides) -> Iterator[CaptionResult]:
        """Stream results in input order, a batch at a time (for large folders). A photo of more
        than `max_pixels` pixels is refused from its header (a server passes a smaller budget)."""
        options = replace(options or self.options, **overrides)
        for batch in iter_features(images, self.feature_encoder, self.cache, batch_size, max_pixels):
            hyps = dict(zip(batch.indices, self.decode_features(batch.features, options)))
            about = dict(zip(batch.indices, self._recognise(batch.features)))
            errors = dict(batch.errors)
            for i in sorted([*hyps, *errors]):
                name = describe_source(images[i])
                yield (CaptionResult(name, error=errors[i].reason) if i in errors
                       else replace(self._result(name, hyps[i]), **about[i]))

    def _recognise(self, features: np.ndarray) -> list[dict]:
        """Per photo, the `CaptionResult` fields about what the encoder sees: labels, familiarity."""
        about: list[dict] = [{} for _ in features]
        if (self.head is None and self.bundle.familiarity is None) or not len(features):
            return about
        vectors = pooled(features)
        # A batch's rows times the ImageNet head and the familiarity reference: products too small
        # to share, after which a second OpenBLAS thread spins against the runtime's and other
        # threads (one thread cut a server's CPU a photo by 16-26 % on 2 cores, docs/serve.md).
        # Other threads' BLAS work during these 0.3 ms a photo runs on one thread too.
        with _BLAS_LOCK, _blas().limit(limits=1, user_api="blas"):
            if self.head is not None:
                for fields, labels in zip(about, self.head.top(vectors)):
                    fields["labels"] = labels
            if (familiarity := self.bundle.familiarity) is not None:
                for fields, score in zip(about, familiarity.scores(vectors)):
                    fields.update(familiarity=float(score), familiarity_threshold=familiarity.threshold)
        return about

    def load_photo(self, source: ImageSource, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """`source` decoded as the encoder takes it (uint8 RGB, squashed to its size), or
        `ImageError`. Captioning the array gives the photo's caption; decoding photos ahead (a
        server, as uploads arrive) lets that work overlap the networks' passes of other photos."""
        return load_image(source, self.feature_encoder.image_size, max_pixels)

    def decode_features(self, features: np.ndarray, options: DecodeOptions | None = None) -> list[list[Hypothesis]]:
        """Decode precomputed features [N, D] (grids [N, H*W, C] for attention models) with this
        captioner's runtime."""
        return decode(self.step_model, features, options or self.options)

    def _result(self, source: str, hyps: list[Hypothesis]) -> CaptionResult:
        text = self.bundle.vocab.decode
        return CaptionResult(source, tuple(Beam(text(h.ids), h.log_prob, h.score, self._attention_map(h))
                                           for h in hyps))

    def _attention_map(self, hyp: Hypothesis) -> np.ndarray | None:
        """[words, H, W]: the hypothesis's weights per word, laid out as the encoder's map. Words the
        vocabulary leaves out of the text (`<unk>` is never chosen) cannot occur, so rows match words."""
        if hyp.attention is None or self.grid_shape is None:
            return None
        return np.asarray(hyp.attention, np.float32).reshape(len(hyp.ids), *self.grid_shape)
