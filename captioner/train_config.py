"""Training settings: `TrainConfig`, the one source of their defaults, and the named presets.

Kept free of TensorFlow so the command line can build its flags (one per field, with the
field's help) and check them before anything heavy is imported.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from captioner.settings import setting

RNN_CELLS = ("lstm", "gru")
MODEL_TYPE_NAMES = ("show-and-tell", "show-attend-tell")  # the keys of captioner.bundle.MODEL_TYPES


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained model; saved in the bundle for reproducibility.
    Presets are overrides of these defaults: `TrainConfig.preset("tiny", epochs=3)`."""

    model_type: str = setting("show-and-tell", "decoder: one pooled image vector (Show and Tell) or "
                               "attention over the CNN's regions (Show, Attend and Tell)", MODEL_TYPE_NAMES)
    embed_dim: int = setting(512, "word embedding size")
    units: int = setting(512, "RNN units")
    num_layers: int = setting(1, "stacked RNN layers")
    dropout: float = setting(0.5, "dropout rate")
    rnn: str = setting("lstm", "recurrent cell (show-and-tell)", RNN_CELLS)
    attention_dim: int = setting(512, "attention layer size (show-attend-tell)")
    attention_lambda: float = setting(1.0, "weight of the doubly stochastic attention regulariser (show-attend-tell)")
    min_count: int = setting(5, "keep words seen at least this often")
    max_len: int = setting(30, "longest caption in words (training and the bundle's decoding default)")
    epochs: int = setting(20, "maximum epochs")
    batch_size: int = setting(64, "captions per step")
    learning_rate: float = setting(2e-3, "peak Adam learning rate")
    warmup_epochs: float = setting(0.5, "epochs of linear learning-rate warm-up")
    clipnorm: float = setting(5.0, "gradient norm clipping")
    label_smoothing: float = setting(0.0, "label smoothing of the loss")
    sampled_softmax: int = setting(0, "train on a softmax over the true next words and this many sampled "
                                   "ones instead of the whole vocabulary (0: the whole vocabulary); dev "
                                   "scores and decoding use the whole one. Show and Tell, no label smoothing")
    patience: int = setting(4, "early-stopping patience (epochs)")
    monitor: str = setting("bleu", "pick the best epoch by dev BLEU-4 or CIDEr-D (greedy) or dev loss",
                           ("bleu", "cider", "loss"))
    dev_images: int = setting(1000, "dev images decoded for the per-epoch BLEU")
    seed: int = setting(0, "random seed")
    shuffle_buffer: int = setting(10_000, "captions held for shuffling when training from sharded features "
                                  "(--train-features; the in-memory path shuffles them all)")
    samples: int = setting(5, "captions sampled per image in self-critical training (--scst); a step "
                           "holds batch-size / samples images")

    @classmethod
    def preset(cls, name: str, **overrides) -> TrainConfig:
        if name not in PRESETS:
            raise ValueError(f"--preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return replace(cls(), **{**PRESETS[name], **overrides})

PRESETS: dict[str, dict] = {
    # The shipped Flickr8k model's first, cross-entropy stage (docs/experiments.md: run B).
    "default": dict(epochs=12, label_smoothing=0.1),
    # Small and quick: the generated demo set, tests and notebooks.
    "tiny": dict(embed_dim=64, units=128, dropout=0.1, min_count=1, max_len=20, epochs=15,
                 batch_size=32, learning_rate=5e-3, patience=5, dev_images=200),
    # Show, Attend and Tell on Flickr8k: the paper's sizes (LSTM and attention 512, lambda 1) and
    # the default preset's recipe otherwise (label smoothing 0.1, dropout 0.5, same schedule), so
    # the comparison with Show and Tell changes one thing: attention. 15 epochs: Show and Tell
    # peaked at 8-10 and early stopping ends the run once dev BLEU-4 stops rising.
    "attend": dict(model_type="show-attend-tell", units=512, attention_dim=512, dropout=0.5, epochs=15,
                   label_smoothing=0.1, attention_lambda=1.0),
    # Self-critical fine-tuning of a trained model (`captioner train --scst`): 16 photos x 5 samples a
    # step, no warm-up, the best epoch by dev CIDEr-D. 2e-4, not the papers' 5e-5: with only 375 steps
    # an epoch on Flickr8k, 5e-5 raised dev CIDEr-D by 2.6 in 3 epochs, 2e-4 by 6.5 (docs/experiments.md).
    "scst": dict(epochs=10, learning_rate=2e-4, warmup_epochs=0.0, batch_size=80, patience=3, monitor="cider"),
}
