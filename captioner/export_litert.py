"""Export a bundle's networks for the LiteRT runtime: `encoder.tflite` and `decoder.tflite`.

    encoder.tflite  signature "features": images [N, S, S, 3] float32 0..255 -> features [N, D]
                    (the network's own preprocessing included); for an attention bundle also
                    grid [N, H, W, D], the map the features are pooled from, from the same pass
    decoder.tflite  signature "init": features [N, D] -> state_0..state_k [N, units]
                    signature "step": tokens [N] int32, state_0..state_k -> log_probs [N, V], state_0..
                    (log-softmax with <pad>, <start>, <unk> never chosen, as the TF runtime does)
                    An attention decoder's (Show, Attend and Tell):
                    "init": grids [N, R, D] -> state_0, state_1 (h, c) [N, units], state_2 (attention)
                            [N, R], keys [N, R, A]
                    "step": tokens [B], images [M] int32, keys [N, R, A], regions [N, R, D] (the grids),
                            state_0..2 -> log_probs [B, V], state_0..2; rows come in M runs of B / M,
                            run i reading image images[i] of keys and regions (see `ShowAttendTell.step`)

The batch dimension is free, so one file serves any number of images and beams. Conversion
goes through Keras's `ExportArchive` (a SavedModel) and TensorFlow's LiteRT converter with
built-in ops only, so the files need no TensorFlow to run.
"""
from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path

import numpy as np

from captioner.encoder import ImageEncoder
from captioner.fileio import atomic_write_bytes
from captioner.model import ShowAttendTell
from captioner.native_logs import filtered_stderr
from captioner.quiet_tensorflow import keras, tf
from captioner.text import Vocabulary


def _convert(track, endpoints: dict, calibration=None) -> bytes:
    """TFLite bytes for `endpoints` (name -> (function, input signature)) of the Keras object `track`;
    with `calibration` (a function yielding input dicts), int8 weights and activations."""
    with tempfile.TemporaryDirectory() as saved_model:
        archive = keras.export.ExportArchive()
        archive.track(track)
        for name, (function, signature) in endpoints.items():
            archive.add_endpoint(name, function, input_signature=signature)
        archive.write_out(saved_model, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model, signature_keys=list(endpoints))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if calibration is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = calibration
        with filtered_stderr(), warnings.catch_warnings():
            # int8 calibration runs TensorFlow's own (deprecated) interpreter: its warning is not ours
            warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")
            return converter.convert()


def decoder_tflite(model) -> bytes:
    """The decoder's `init` and `step` as one LiteRT model."""
    banned = Vocabulary.banned_logits(model.vocab_size)
    attends = isinstance(model, ShowAttendTell)
    if attends:
        r, d = model.regions, model.feature_dim
        widths = [model.units, model.units, r]
        features = tf.TensorSpec([None, r, d], tf.float32, name="grids")
        context = [tf.TensorSpec([None], tf.int32, name="images"),
                   tf.TensorSpec([None, r, model.attention_dim], tf.float32, name="keys"),
                   tf.TensorSpec([None, r, d], tf.float32, name="regions")]
    else:
        widths = [model.units] * (model.num_layers * model.states_per_layer)
        features, context = tf.TensorSpec([None, model.feature_dim], tf.float32, name="features"), []
    state_specs = [tf.TensorSpec([None, w], tf.float32, name=f"state_{i}") for i, w in enumerate(widths)]

    def init(features):
        out = {f"state_{i}": s for i, s in enumerate(model.initial_state(features))}
        if attends:  # the regions are the grids themselves: the runtime keeps its own
            out["keys"] = model.image_context(features)[0]
        return out

    def step(tokens, *inputs):  # inputs: images, keys, regions (attention decoders only), then the states
        reads, states = inputs[: len(context)], list(inputs[len(context) :])
        logits, states = model.step(tokens, states, reads[1:], reads[0] if reads else None)
        return {"log_probs": tf.nn.log_softmax(logits + banned), **{f"state_{i}": s for i, s in enumerate(states)}}

    return _convert(model, {
        "init": (init, [features]),
        "step": (step, [tf.TensorSpec([None], tf.int32, name="tokens"), *context, *state_specs]),
    })


def encoder_tflite(encoder, calibration_images: np.ndarray | None = None, grid: bool = False) -> bytes:
    """The encoder's preprocessing and network as one LiteRT model, with the spatial map too if
    `grid`; int8-quantised when given photos to calibrate on ([N, S, S, 3], 0..255: training
    photos, never evaluation ones)."""
    size = encoder.image_size
    def calibration():
        for image in calibration_images:
            yield {"images": image[None].astype(np.float32)}

    def features(images):
        if grid:
            pooled, spatial = encoder.grid_model(encoder.preprocess(images), training=False)
            return {"features": pooled, "grid": spatial}
        return {"features": encoder.model(encoder.preprocess(images), training=False)}

    return _convert(encoder.grid_model if grid else encoder.model, {
        "features": (features, [tf.TensorSpec([None, size, size, 3], tf.float32, name="images")]),
    }, None if calibration_images is None else calibration)


def calibration_photos(dataset, image_size: int, count: int = 200, seed: int = 0) -> np.ndarray:
    """`count` photos of the dataset's train split (never evaluation photos), [N, S, S, 3] 0..255,
    to calibrate an int8 encoder on."""
    from captioner.images import load_image

    train = dataset.splits.get("train") or []
    if not train:
        raise ValueError(f"{dataset.root}: no train split to calibrate an int8 encoder on")
    chosen = np.random.default_rng(seed).choice(train, min(count, len(train)), replace=False)
    return np.stack([load_image(dataset.images[i], image_size) for i in chosen])


def export_litert(model, encoder, directory: Path, calibration_images: np.ndarray | None = None) -> dict[str, str]:
    """Write `encoder.tflite` and `decoder.tflite` into `directory` (and `encoder.int8.tflite`, given
    training photos to calibrate on); their SHA-256 by file name."""
    grid = isinstance(model, ShowAttendTell)
    files = [("encoder.tflite", encoder_tflite(encoder, grid=grid)), ("decoder.tflite", decoder_tflite(model))]
    if calibration_images is not None:
        files.append(("encoder.int8.tflite", encoder_tflite(encoder, calibration_images, grid)))
    hashes = {}
    for name, data in files:
        atomic_write_bytes(directory / name, data)
        hashes[name] = hashlib.sha256(data).hexdigest()
    return hashes


def add_litert_files(bundle_dir: str | Path, encoder: ImageEncoder | str = "default",
                     calibration_images: np.ndarray | None = None) -> dict[str, str]:
    """Give a bundle its LiteRT files (what `captioner export` and the end of training do): the
    encoder it was trained with (or weights to build it with) goes in too, and an int8 encoder
    when given training photos to calibrate it on. The decoder and vocabulary stay as they are;
    config.json is rewritten last, so a crash leaves the old bundle."""
    from captioner.bundle import BundleError, load_bundle, write_config

    bundle = load_bundle(bundle_dir)
    bundle.refuse_ensemble("export")
    if isinstance(encoder, str):
        encoder = ImageEncoder(bundle.encoder["name"], encoder)
    if encoder.describe() != bundle.encoder:
        raise BundleError(f"{bundle_dir}: encoder {encoder.name} ({encoder.weights_id[:20]}) is not the one "
                          "the bundle was trained with")
    hashes = export_litert(bundle.model, encoder, Path(bundle_dir), calibration_images)
    write_config(Path(bundle_dir), bundle, hashes)
    return hashes
