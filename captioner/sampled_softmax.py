"""Training Show and Tell with a sampled softmax: each step scores the true next words against a
few sampled ones instead of the whole vocabulary (Jean et al. 2015, `tf.nn.sampled_softmax_loss`),
which cuts the vocabulary projection's share of the step. Validation loss and decoding keep the
full softmax."""
from __future__ import annotations

from captioner.model import ShowAndTell
from captioner.quiet_tensorflow import keras, tf
from captioner.text import Vocabulary


class SampledSoftmaxTrainer(keras.Model):
    """Fits `decoder` with a sampled softmax over `num_sampled` words a step, drawn log-uniformly
    (the vocabulary is ordered by frequency, which that sampler assumes). `call` is the decoder's,
    so `evaluate` and the compiled loss score the full softmax; `fit` reports the sampled loss,
    which is lower than the full one and not comparable with it."""

    def __init__(self, decoder: ShowAndTell, num_sampled: int, **kwargs):
        super().__init__(**kwargs)
        if not 0 < num_sampled < decoder.vocab_size:
            raise ValueError(f"--sampled-softmax: must be from 1 to {decoder.vocab_size - 1} (the vocabulary has "
                             f"{decoder.vocab_size} words), got {num_sampled}")
        self.decoder, self.num_sampled = decoder, int(num_sampled)

    def call(self, inputs, training: bool = False):
        return self.decoder(inputs, training=training)

    def train_step(self, data):
        (features, tokens), targets = data
        real = targets != Vocabulary.pad_id  # the loss covers real positions only, as MaskedCrossEntropy's
        with tf.GradientTape() as tape:
            hidden = tf.boolean_mask(self.decoder.hidden((features, tokens), training=True), real)
            head = self.decoder.head
            loss = tf.nn.sampled_softmax_loss(
                weights=tf.transpose(head.kernel), biases=head.bias,
                labels=tf.cast(tf.boolean_mask(targets, real), tf.int64)[:, None], inputs=hidden,
                num_sampled=self.num_sampled, num_classes=self.decoder.vocab_size,
            )
            # Per replica, as MaskedCrossEntropy: `fit` sums the replicas' gradients.
            loss = tf.reduce_mean(loss) / tf.distribute.get_strategy().num_replicas_in_sync
        variables = self.decoder.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        for metric in self.metrics:  # `fit` reports the metrics, the loss tracker among them
            if metric.name == "loss":
                metric.update_state(loss)
        return {metric.name: metric.result() for metric in self.metrics}
