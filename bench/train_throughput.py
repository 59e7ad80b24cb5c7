"""Training throughput of the decoder at the default model size, against this machine's matmul rate.

The training step is the package's own: `ShowAndTell` at `TrainConfig.preset("default")`
sizes, `MaskedCrossEntropy`, Adam with clipping, batches from
`captioner.training.teacher_forcing_dataset` (length-bucketed), driven by `model.fit`.
Captions are Flickr8k's train captions through the package's vocabulary (min_count 5) when
Flickr8k (`$CAPTIONER_DATA` or data/flickr8k) is there, else random word ids with Flickr8k-like lengths; the image
features are random (their values do not change the arithmetic).

FLOPs per real token (multiply-add = 2), forward: LSTM gates 2*4*(E+U)*U plus the vocabulary
projection 2*U*V; x3 for forward + backward. The same run measures a dense float32 matmul
(2048x2048 in a tf.function, best of 3) before and after each chunk of steps as the machine's
arithmetic limit at that time; the fraction is against the median of those measurements.

    python bench/train_throughput.py                  # 300 timed steps in 5 chunks
    python bench/train_throughput.py --steps 20       # a quick look
    python bench/train_throughput.py --jit-compile --batch-size 128    # try a variant
"""
from __future__ import annotations

import argparse
import sys
import time

import common
from common import machine_info, matmul_gflops, print_table, write_result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="timed training steps")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps first (tracing every bucket's shape)")
    p.add_argument("--batch-size", type=int, help="captions per step (default: the default preset's)")
    p.add_argument("--vocab", type=int, default=2600, help="vocabulary size without Flickr8k captions")
    p.add_argument("--jit-compile", action="store_true", help="compile the train step with XLA")
    p.add_argument("--precisions", default="float32,mixed_bfloat16",
                   help="Keras dtype policies to compare, chunk by chunk in the same run (the first is the reference)")
    p.add_argument("--chunks", type=int, default=5, help="timed chunks, with a matmul measurement around each")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--synthetic", action="store_true", help="random captions even when Flickr8k is there")
    p.add_argument("--output", metavar="FILE", help="result JSON (default bench/results/train_throughput.json)")
    return p.parse_args(argv)


def caption_data(config, vocab_size: int, synthetic: bool):
    """(vocabulary, rows, sequences, where from): Flickr8k's train captions, or random ones."""
    import numpy as np

    from captioner.text import SPECIAL_TOKENS, Vocabulary
    from captioner.training import caption_sequences

    root = common.FLICKR8K_IMAGES.parent
    if not synthetic and root.is_dir():
        from captioner.data import load_dataset

        dataset = load_dataset(root)
        ids = dataset.splits["train"]
        vocab = Vocabulary.build((c for i in ids for c in dataset.captions[i]), config.min_count)
        rows, sequences = caption_sequences(dataset, ids, vocab, config.max_len)
        return vocab, rows, sequences, f"flickr8k train captions ({root})"
    rng = np.random.default_rng(0)
    vocab = Vocabulary([*SPECIAL_TOKENS, *(f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS)))])
    n_images, per_image = 6000, 5
    # Flickr8k's caption lengths: mean 11.8 words, sd 3.9 (cut at max_len like the package does).
    words = np.clip(np.rint(rng.normal(11.8, 3.9, n_images * per_image)), 1, config.max_len).astype(int)
    sequences = np.zeros((len(words), words.max() + 2), np.int32)
    for i, n in enumerate(words):
        sequences[i, : n + 2] = [vocab.start_id, *rng.integers(len(SPECIAL_TOKENS), vocab_size, n), vocab.end_id]
    return vocab, np.repeat(np.arange(n_images, dtype=np.int32), per_image), sequences, "random ids, Flickr8k-like lengths"


def count_metrics() -> list:
    """Keras metrics summing, over a `fit`, the real target tokens, the target positions
    (padding included: the LSTM and the projection compute those too) and the captions."""
    import keras
    from keras import ops

    class Count(keras.metrics.Metric):
        def __init__(self, what: str):
            super().__init__(name=what)
            self.what = what
            self.total = self.add_variable(shape=(), initializer="zeros", name="total", dtype="float32")

        def update_state(self, y_true, y_pred, sample_weight=None):
            if self.what == "tokens":
                value = ops.sum(ops.cast(ops.not_equal(y_true, 0), "float32"))
            elif self.what == "positions":
                value = ops.cast(ops.size(y_true), "float32")
            else:
                value = ops.cast(ops.shape(y_true)[0], "float32")
            self.total.assign_add(value)

        def result(self):
            return self.total

    return [Count(what) for what in ("tokens", "positions", "captions")]


def main(argv=None) -> int:
    args = parse_args(argv)
    info = machine_info()

    import numpy as np

    from captioner.model import MaskedCrossEntropy, ShowAndTell
    from captioner.quiet_tensorflow import keras
    from captioner.training import TrainConfig, teacher_forcing_dataset

    config = TrainConfig.preset("default", **({"batch_size": args.batch_size} if args.batch_size else {}))
    keras.utils.set_random_seed(config.seed)
    vocab, rows, sequences, source = caption_data(config, args.vocab, args.synthetic)
    feature_dim = 1280  # the default encoder's
    features = np.random.default_rng(1).normal(size=(rows.max() + 1, feature_dim)).astype(np.float32)
    dataset = teacher_forcing_dataset(features, rows, sequences, vocab, config.batch_size, True, config.seed).repeat()
    V, E, U = len(vocab), config.embed_dim, config.units
    print(f"{source}: {len(rows)} captions, vocabulary {V}; model E={E} U={U} batch {config.batch_size}; "
          f"load average {info['load_average_at_start']}")

    precisions = args.precisions.split(",")
    models = {}
    for precision in precisions:
        keras.mixed_precision.set_dtype_policy(precision)  # layers take the policy when built
        model = ShowAndTell(V, feature_dim, E, U, config.num_layers, config.dropout, config.rnn)
        model.compile(optimizer=keras.optimizers.Adam(config.learning_rate, clipnorm=config.clipnorm),
                      loss=MaskedCrossEntropy(config.label_smoothing),
                      metrics=count_metrics(),
                      jit_compile=args.jit_compile)
        model.fit(dataset, epochs=1, steps_per_epoch=args.warmup, verbose=0)
        models[precision] = model
    keras.mixed_precision.set_dtype_policy("float32")

    # The machine is shared: measure its matmul rate between chunks of training, so each
    # chunk is compared with what the machine delivered around the same time; the precisions
    # take turns chunk by chunk, so both see the same machine.
    lstm = 2 * 4 * (E + U) * U * config.num_layers
    projection = 2 * U * V
    flops_per_token = 3 * (lstm + projection)
    rates = [matmul_gflops(args.matmul_size, repeats=3)["best_gflops"]]
    chunks, by_precision = [], {p: [] for p in precisions}
    for steps in np.diff(np.linspace(0, args.steps, args.chunks + 1).round().astype(int)):
        for precision, model in models.items():
            start = time.perf_counter()
            history = model.fit(dataset, epochs=1, steps_per_epoch=int(steps), verbose=0).history
            seconds = time.perf_counter() - start
            tokens = history["tokens"][-1]
            by_precision[precision].append({"seconds": seconds, "tokens": tokens, "loss": history["loss"][-1]})
            if precision != precisions[0]:
                continue
            rates.append(matmul_gflops(args.matmul_size, repeats=3)["best_gflops"])
            positions, captions = history["positions"][-1], history["captions"][-1]
            achieved = tokens * flops_per_token / seconds / 1e9
            chunks.append({"steps": int(steps), "seconds": seconds, "tokens": tokens, "positions": positions,
                           "captions": captions, "achieved_gflops": achieved,
                           "matmul_gflops": (rates[-2] + rates[-1]) / 2,
                           "fraction": achieved / ((rates[-2] + rates[-1]) / 2), "loss": history["loss"][-1]})
    speed = {p: sum(c["tokens"] for c in cs) / sum(c["seconds"] for c in cs) for p, cs in by_precision.items()}

    seconds = sum(c["seconds"] for c in chunks)
    tokens, positions, captions = (sum(c[k] for c in chunks) for k in ("tokens", "positions", "captions"))
    achieved = tokens * flops_per_token / seconds / 1e9
    matmul = float(np.median(rates))
    result = {
        "machine": info,
        "config": {**vars(args), "data": source, "vocab_size": V, "embed_dim": E, "units": U,
                   "batch_size": config.batch_size, "feature_dim": feature_dim},
        "steps": args.steps, "seconds": seconds, "tokens": tokens, "positions": positions, "captions": captions,
        "padding_fraction": 1 - tokens / positions,
        "tokens_per_s": tokens / seconds, "captions_per_s": captions / seconds,
        "ms_per_step": 1000 * seconds / args.steps,
        "flops_per_token": {"lstm_forward": lstm, "projection_forward": projection, "total_x3": flops_per_token},
        "achieved_gflops": achieved, "executed_gflops_with_padding": positions * flops_per_token / seconds / 1e9,
        "matmul_gflops": {"interleaved_best_of_3": rates, "median": matmul, "best": max(rates)},
        "fraction_of_matmul_rate": achieved / matmul,
        "fraction_of_best_matmul_rate": achieved / max(rates),
        "chunks": chunks,
        "precisions": {p: {"tokens_per_s": speed[p], "vs_reference": speed[p] / speed[precisions[0]],
                           "last_loss": by_precision[p][-1]["loss"]} for p in precisions},
    }
    print_table([
        {"what": "training step", "tokens/s": result["tokens_per_s"], "captions/s": result["captions_per_s"],
         "ms/step": result["ms_per_step"], "padding": f"{100 * result['padding_fraction']:.1f}%",
         "GFLOP/s": achieved, "of matmul": f"{100 * result['fraction_of_matmul_rate']:.0f}%"},
        {"what": f"matmul {args.matmul_size}^2 float32, median", "GFLOP/s": matmul},
        {"what": f"matmul {args.matmul_size}^2 float32, best", "GFLOP/s": max(rates)},
    ], title=f"Training at the default size (load average at start {info['load_average_at_start']})")
    print(f"FLOPs per token: {flops_per_token / 1e6:.1f} M (LSTM {lstm / 1e6:.2f} M + projection "
          f"{projection / 1e6:.2f} M, x3)")
    print("each chunk against the matmul rate around it: "
          + ", ".join(f"{100 * c['fraction']:.0f}%" for c in chunks))
    for p in precisions[1:]:
        print(f"{p}: {speed[p]:,.0f} tokens/s, {speed[p] / speed[precisions[0]]:.2f}x {precisions[0]} in this run "
              f"(last loss {by_precision[p][-1]['loss']:.3f} vs {by_precision[precisions[0]][-1]['loss']:.3f})")
    write_result("train_throughput", result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
