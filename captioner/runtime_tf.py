"""The TensorFlow runtime: a trained Keras decoder as the `StepModel` that decoding drives.

`initial_state` and `step` are compiled once (`tf.function`); NumPy goes in and comes out,
so the search itself (`captioner.decoding`) is the same whatever runtime runs the network.
"""
from __future__ import annotations

import numpy as np

from captioner.model import ShowAndTell, ShowAttendTell
from captioner.quiet_tensorflow import tf
from captioner.text import Vocabulary


class TensorFlowStep:
    """A `StepModel` over a Keras decoder (`ShowAndTell`, `ShowAttendTell`); it reads the model's
    live weights, so it also decodes during training."""

    runtime = "tf"

    def __init__(self, model: ShowAndTell | ShowAttendTell):
        self.model = model
        #: which state holds the last step's attention weights (attention decoders only)
        self.attention_state: int | None = getattr(model, "attention_state", None)
        # Never emit the tokens that are not words; <unk> is a word-shaped gap in a caption.
        banned = tf.constant(Vocabulary.banned_logits(model.vocab_size))
        # Lambdas, not bound methods: TF counts traces per function code, and several decoders in
        # one process would otherwise set off its "frequent retracing" warning.
        self._init = tf.function(lambda f: (model.initial_state(f), model.image_context(f)), reduce_retracing=True)
        self._step = tf.function(
            lambda tokens, states, context, images: _log_softmax_step(model, tokens, states, context, images, banned),
            reduce_retracing=True,
        )

    def initial_state(self, features: np.ndarray) -> tuple[list[np.ndarray], list[tf.Tensor]]:
        states, context = self._init(tf.constant(features, tf.float32))
        # The context stays a TensorFlow tensor: every step reads it in place, never converted.
        return [s.numpy() for s in states], context

    def step(self, tokens: np.ndarray, states: list[np.ndarray], context: list[tf.Tensor],
             images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        log_probs, states = self._step(tf.constant(tokens, tf.int32), [tf.constant(s) for s in states], context,
                                       tf.constant(images, tf.int32))
        return log_probs.numpy(), [s.numpy() for s in states]


def _log_softmax_step(model: ShowAndTell | ShowAttendTell, tokens, states, context, images, banned):
    logits, states = model.step(tokens, states, context, images)
    return tf.nn.log_softmax(logits + banned), states
