"""The Show-and-Tell decoder: an image feature initialises the state of an LSTM over words."""
from __future__ import annotations

from captioner.quiet_tensorflow import keras, tf

layers, ops = keras.layers, keras.ops

RNN_TYPES = {"lstm": (layers.LSTM, 2), "gru": (layers.GRU, 1)}  # layer, states per layer; keys: RNN_CELLS


@keras.saving.register_keras_serializable(package="captioner")
class ShowAndTell(keras.Model):
    """Image feature -> Dense -> initial (h, c) of each RNN layer; words -> Embedding -> RNN -> Dense.

    `call((features, tokens))` returns next-word logits for every position (teacher forcing);
    `initial_state` and `step` run the same weights one token at a time for decoding.
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int = 512,
        units: int = 512,
        num_layers: int = 1,
        dropout: float = 0.5,
        rnn: str = "lstm",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if rnn not in RNN_TYPES:
            raise ValueError(f"rnn must be one of {sorted(RNN_TYPES)}, got {rnn!r}")
        self.vocab_size, self.feature_dim = int(vocab_size), int(feature_dim)
        self.embed_dim, self.units, self.num_layers = int(embed_dim), int(units), int(num_layers)
        self.dropout_rate, self.rnn_type = float(dropout), rnn
        rnn_class, self.states_per_layer = RNN_TYPES[rnn]

        self.feature_dropout = layers.Dropout(self.dropout_rate, name="feature_dropout")
        self.init_state = [
            layers.Dense(self.units, activation="tanh", name=f"init_state_{i}")
            for i in range(self.num_layers * self.states_per_layer)
        ]
        self.embedding = layers.Embedding(self.vocab_size, self.embed_dim, name="embedding")
        self.rnns = [
            rnn_class(self.units, return_sequences=True, return_state=True, name=f"{rnn}_{i}")
            for i in range(self.num_layers)
        ]
        self.dropout = layers.Dropout(self.dropout_rate, name="dropout")
        self.head = layers.Dense(self.vocab_size, name="logits")
        self.build()

    def build(self, input_shape=None) -> None:
        # Built eagerly from the config alone, so `step` works on a fresh model and a model
        # restored from its config has every weight before loading.
        if self.built:
            return
        batch = 1
        self.embedding.build()
        self.initial_state(ops.zeros((batch, self.feature_dim)))
        self.call((ops.zeros((batch, self.feature_dim)), ops.ones((batch, 2), dtype="int32")))
        self.built = True

    def initial_state(self, features, training: bool = False) -> list:
        """The RNN states [h0, c0] per layer (LSTM) or [h0] (GRU), computed from the image feature."""
        x = self.feature_dropout(features, training=training)
        return [dense(x) for dense in self.init_state]

    def _layer_states(self, states: list, i: int) -> list:
        k = self.states_per_layer
        return states[i * k : (i + 1) * k]

    def call(self, inputs, training: bool = False):
        features, tokens = inputs
        states = self.initial_state(features, training=training)
        # No padding mask for the RNN: captions are padded at the end, so the outputs before the
        # padding do not depend on it and the loss ignores the rest. (With a mask, Keras transposes
        # a boolean tensor, which TensorFlow's oneDNN build logs as an error on AVX-512 CPUs.)
        x = ops.take(self.embedding.embeddings, tokens, axis=0)
        for i, rnn in enumerate(self.rnns):
            x = rnn(x, initial_state=self._layer_states(states, i), training=training)[0]
            x = self.dropout(x, training=training)
        return self.head(x)

    def step(self, tokens, states: list) -> tuple:
        """One decoding step for a batch: token ids [B] and states -> (logits [B, V], new states)."""
        x = ops.take(self.embedding.embeddings, tokens, axis=0)
        new_states = []
        for i, rnn in enumerate(self.rnns):
            x, layer_states = rnn.cell(x, self._layer_states(states, i))
            new_states.extend(layer_states if isinstance(layer_states, (list, tuple)) else [layer_states])
        return self.head(x), new_states

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "feature_dim": self.feature_dim,
            "embed_dim": self.embed_dim,
            "units": self.units,
            "num_layers": self.num_layers,
            "dropout": self.dropout_rate,
            "rnn": self.rnn_type,
        }


@keras.saving.register_keras_serializable(package="captioner")
class MaskedCrossEntropy(keras.losses.Loss):
    """Next-word cross-entropy averaged over the real tokens of a batch: `<pad>` (id 0) targets
    count for nothing, however much padding a batch has.

    Under a `tf.distribute` strategy each replica's mean is divided by the number of replicas, as
    Keras does for its own mean losses: `fit` sums the replicas' gradients and multiplies the
    logged loss back, so step and figure match one device's."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "masked_cross_entropy", **kwargs):
        kwargs["reduction"] = "sum"  # the mean over real tokens is taken in `call`
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "int32")
        if self.label_smoothing:
            onehot = ops.one_hot(y_true, ops.shape(y_pred)[-1])
            loss = keras.losses.categorical_crossentropy(
                onehot, y_pred, from_logits=True, label_smoothing=self.label_smoothing
            )
        else:
            loss = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        real = ops.cast(ops.not_equal(y_true, 0), loss.dtype)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return loss * real / ops.maximum(ops.sum(real), 1.0) / replicas

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("reduction", None)
        return {**config, "label_smoothing": self.label_smoothing}
