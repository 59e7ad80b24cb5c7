"""The decoders. Show and Tell: an image feature initialises the state of an LSTM over words.
Show, Attend and Tell: the LSTM also reads, at every word, a weighted average of the image's regions."""
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
        return self.head(self.hidden(inputs, training=training))

    def hidden(self, inputs, training: bool = False):
        """What `head` turns into next-word logits: the last RNN layer's outputs [B, T, units]."""
        features, tokens = inputs
        states = self.initial_state(features, training=training)
        # No padding mask for the RNN: captions are padded at the end, so the outputs before the
        # padding do not depend on it and the loss ignores the rest. (With a mask, Keras transposes
        # a boolean tensor, which TensorFlow's oneDNN build logs as an error on AVX-512 CPUs.)
        x = ops.take(self.embedding.embeddings, tokens, axis=0)
        for i, rnn in enumerate(self.rnns):
            x = rnn(x, initial_state=self._layer_states(states, i), training=training)[0]
            x = self.dropout(x, training=training)
        return x

    def image_context(self, features) -> list:
        """What the decoder reads of each image at every word: nothing (the feature only sets the
        first state). Here for the decoding interface `ShowAttendTell` defines."""
        return []

    def step(self, tokens, states: list, context=(), images=None) -> tuple:
        """One decoding step for a batch: token ids [B] and states -> (logits [B, V], new states).
        (`context` and `images` are the attention decoder's; this one has no context.)"""
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
class AttentionLSTMCell(layers.Layer):
    """One word of Show, Attend and Tell (Xu et al. 2015, soft attention): scores the regions
    from h_{t-1} (Bahdanau: w . tanh(keys + W h)), gates their weighted average with a scalar
    sigmoid(f(h)), and feeds [word embedding, context] to an LSTM cell.

    As a `keras.layers.RNN` cell (training), its states are h, c, the projected regions (keys)
    and the regions, the last two flattened because the RNN takes only [batch, size] states;
    they ride through the loop unchanged. Output: [h_t, context, attention weights] concatenated.
    Decoding calls `advance` instead, with each image's keys and regions given once for all its beams.
    """

    def __init__(self, units: int, regions: int, feature_dim: int, attention_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.units, self.regions, self.feature_dim, self.attention_dim = units, regions, feature_dim, attention_dim
        self.lstm = layers.LSTMCell(units, name="lstm")
        self.query = layers.Dense(attention_dim, use_bias=False, name="query")
        self.score = layers.Dense(1, use_bias=False, name="score")  # a bias would cancel in the softmax
        self.gate = layers.Dense(1, activation="sigmoid", name="gate")
        self.state_size = [units, units, regions * attention_dim, regions * feature_dim]
        self.output_size = units + feature_dim + regions

    def build(self, input_shape) -> None:
        self.query.build((None, self.units))
        self.score.build((None, self.regions, self.attention_dim))
        self.gate.build((None, self.units))
        self.lstm.build((None, input_shape[-1] + self.feature_dim))
        self.built = True

    def call(self, inputs, states, training: bool = False):
        h, c, keys, grid = states
        h, c, context, alpha = self.advance(inputs, h, c, ops.reshape(keys, (-1, self.regions, self.attention_dim)),
                                            ops.reshape(grid, (-1, self.regions, self.feature_dim)), training)
        return ops.concatenate([h, context, alpha], -1), [h, c, states[2], states[3]]

    def advance(self, inputs, h, c, keys, grid, training: bool = False) -> tuple:
        """One word for B rows that come in M runs of k, run i reading image i: inputs [B, E],
        h and c [B, units], keys [M, R, attention_dim], grid [M, R, C] -> new h, c, the context
        [B, C] and the weights [B, R] it was read with. (Training: k = 1; beam search: k beams.)"""
        runs = ops.shape(keys)[0]
        queries = ops.expand_dims(self.query(ops.reshape(h, (runs, -1, self.units))), 2)  # [M, k, 1, A]
        scores = ops.squeeze(self.score(ops.tanh(ops.expand_dims(keys, 1) + queries)), -1)  # [M, k, R]
        alpha = ops.softmax(scores, axis=-1)
        context = self.gate(h) * ops.reshape(ops.matmul(alpha, grid), (-1, self.feature_dim))
        _, (h, c) = self.lstm(ops.concatenate([inputs, context], -1), [h, c], training=training)
        return h, c, context, ops.reshape(alpha, (-1, self.regions))

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units, "regions": self.regions,
                "feature_dim": self.feature_dim, "attention_dim": self.attention_dim}


@keras.saving.register_keras_serializable(package="captioner")
class ShowAttendTell(keras.Model):
    """Regions [R, C] of the image's CNN map -> mean -> Dense -> initial (h, c); at each word, soft
    attention over the regions feeds the LSTM; next-word logits from embedding + h + context
    (the paper's deep output). Same interface as `ShowAndTell`, on grids [B, R, C] instead of
    vectors: `call((grids, tokens))` for teacher forcing, `initial_state`, `image_context` and
    `step` to decode.

    Decoding carries the states [h, c, attention] per beam (`attention_state` indexes the last
    step's weights over the regions [B, R], so beam search keeps them with their beams) and
    reads each image's regions and their keys (`image_context`, computed once) by image index,
    so beams never copy them. In training, the doubly stochastic regulariser
    `attention_lambda * sum_regions (1 - sum_t alpha)^2` (per caption, scaled like the loss: per
    real token) is added as a model loss.
    """

    attention_state = 2

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        regions: int,
        embed_dim: int = 512,
        units: int = 512,
        attention_dim: int = 512,
        dropout: float = 0.5,
        attention_lambda: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size, self.feature_dim, self.regions = int(vocab_size), int(feature_dim), int(regions)
        self.embed_dim, self.units, self.attention_dim = int(embed_dim), int(units), int(attention_dim)
        self.dropout_rate, self.attention_lambda = float(dropout), float(attention_lambda)

        self.feature_dropout = layers.Dropout(self.dropout_rate, name="feature_dropout")
        self.init_h = layers.Dense(self.units, activation="tanh", name="init_h")
        self.init_c = layers.Dense(self.units, activation="tanh", name="init_c")
        self.keys = layers.Dense(self.attention_dim, name="keys")
        self.embedding = layers.Embedding(self.vocab_size, self.embed_dim, name="embedding")
        self.cell = AttentionLSTMCell(self.units, self.regions, self.feature_dim, self.attention_dim,
                                      name="attention_lstm")
        self.rnn = layers.RNN(self.cell, return_sequences=True, name="rnn")
        self.out_h = layers.Dense(self.embed_dim, name="out_h")
        self.out_context = layers.Dense(self.embed_dim, name="out_context")
        self.dropout = layers.Dropout(self.dropout_rate, name="dropout")
        self.head = layers.Dense(self.vocab_size, name="logits")
        self.build()

    def build(self, input_shape=None) -> None:
        # Built eagerly from the config alone, as ShowAndTell is.
        if self.built:
            return
        self.embedding.build()
        self.call((ops.zeros((1, self.regions, self.feature_dim)), ops.ones((1, 2), dtype="int32")))
        self.built = True

    def initial_state(self, grids, training: bool = False) -> list:
        """[h0, c0, attention] for grids [B, R, C] (float16 or float32); no attention yet: zeros."""
        x = self.feature_dropout(ops.mean(ops.cast(grids, "float32"), axis=1), training=training)
        return [self.init_h(x), self.init_c(x), ops.zeros((ops.shape(grids)[0], self.regions))]

    def image_context(self, grids) -> list:
        """What every step reads of each image: its projected regions (keys) [B, R, attention_dim]
        and its regions [B, R, C], float32."""
        grids = ops.cast(grids, "float32")
        return [self.keys(grids), grids]

    def word_logits(self, embedded, h, context, training: bool = False):
        """Next-word logits from the word's embedding, the new h and the context (the deep output)."""
        return self.head(self.dropout(embedded + self.out_h(h) + self.out_context(context), training=training))

    def call(self, inputs, training: bool = False):
        grids, tokens = inputs
        h, c, _ = self.initial_state(grids, training=training)
        keys, regions = self.image_context(grids)
        batch = ops.shape(grids)[0]
        x = ops.take(self.embedding.embeddings, tokens, axis=0)
        # No mask for the RNN, as in ShowAndTell: padding comes last and the loss ignores it.
        outputs = self.rnn(x, initial_state=[h, c, ops.reshape(keys, (batch, -1)), ops.reshape(regions, (batch, -1))],
                           training=training)
        h, context, alpha = ops.split(outputs, [self.units, self.units + self.feature_dim], axis=-1)
        real = ops.cast(ops.not_equal(tokens, 0), alpha.dtype)
        coverage = ops.sum(alpha * ops.expand_dims(real, -1), axis=1)  # [B, R]: attention each region got
        self.add_loss(self.attention_lambda * ops.sum(ops.square(1.0 - coverage)) / ops.maximum(ops.sum(real), 1.0))
        return self.word_logits(x, h, context, training)

    def step(self, tokens, states: list, context: list, images) -> tuple:
        """One decoding step: token ids [B], states [h, c, attention] [B, ...], the `image_context`
        of N images and which image each run of rows reads, `images` [M] (B = M * k: rows
        i*k .. i*k+k-1 read image images[i]) -> (logits [B, V], new states, the last one the
        attention weights [B, R] behind these logits)."""
        keys, regions = (ops.take(part, images, axis=0) for part in context)
        x = ops.take(self.embedding.embeddings, tokens, axis=0)
        h, c, read, alpha = self.cell.advance(x, states[0], states[1], keys, regions)
        return self.word_logits(x, h, read), [h, c, alpha]

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "feature_dim": self.feature_dim,
            "regions": self.regions,
            "embed_dim": self.embed_dim,
            "units": self.units,
            "attention_dim": self.attention_dim,
            "dropout": self.dropout_rate,
            "attention_lambda": self.attention_lambda,
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
