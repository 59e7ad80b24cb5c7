"""Training throughput of the decoder at the default model size, against this machine's matmul rate,
and variants of the step against the reference, chunk by chunk in the same run.

The reference step is the package's before any variant: `ShowAndTell` at
`TrainConfig.preset("default")` sizes, `MaskedCrossEntropy` with the preset's label smoothing,
Keras's Adam with clipping, batches from `captioner.training.teacher_forcing_dataset`
(length-bucketed), driven by `model.fit`. Captions are Flickr8k's train captions through the
package's vocabulary (min_count 5) when Flickr8k (`$CAPTIONER_DATA` or data/flickr8k) is there,
else random word ids with Flickr8k-like lengths; the image features are random (their values do
not change the arithmetic). Every variant trains on the same captions: each chunk is the same
first batches of the pipeline, replayed.

FLOPs per real token (multiply-add = 2), forward: LSTM gates 2*4*(E+U)*U plus the vocabulary
projection 2*U*V; x3 for forward + backward. The same run measures a dense float32 matmul
(2048x2048 in a tf.function, best of 3) before and after each chunk of steps as the machine's
arithmetic limit at that time; the fraction is against the median of those measurements.

    python bench/train_throughput.py                  # 300 timed steps in 5 chunks
    python bench/train_throughput.py --steps 20       # a quick look
    python bench/train_throughput.py --variants float32,sampled512,sampled1024,batch256,jit
    python bench/train_throughput.py --threads 2,1    # TensorFlow's thread pools for the whole run
"""
from __future__ import annotations

import argparse
import sys
import time

import common
from common import machine_info, matmul_gflops, print_table, write_result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=VARIANT_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="timed training steps")
    p.add_argument("--warmup", type=int, default=30,
                   help="untimed steps first, at least a chunk's (tracing every batch shape)")
    p.add_argument("--batch-size", type=int, help="captions per step (default: the default preset's)")
    p.add_argument("--vocab", type=int, default=2600, help="vocabulary size without Flickr8k captions")
    p.add_argument("--jit-compile", action="store_true", help="compile the train step with XLA")
    p.add_argument("--variants", default="float32,mixed_bfloat16,fused-adam,sampled1024,batch128",
                   help="training steps to compare, chunk by chunk in the same run (the first is the reference); "
                        "see below")
    p.add_argument("--threads", metavar="INTRA,INTER", help="TensorFlow's op thread pools (default: its own choice)")
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


VARIANT_HELP = """Variants: names joined by "+", each a change to the reference step (float32, Keras's Adam,
the default preset's batch and label smoothing): mixed_bfloat16 (the Keras dtype policy),
fused-adam (captioner.training.FusedAdam), sampled<N> (a sampled softmax over N words,
captioner.sampled_softmax; no label smoothing), batch<N> (N captions a step, the learning rate
scaled by sqrt(N / default)), jit (XLA on the train step). E.g. float32,fused-adam,sampled1024,batch256."""


def build_variant(name: str, config, vocab_size: int, feature_dim: int, jit_compile: bool):
    """(model compiled for `fit`, captions a step) for a variant name (see VARIANT_HELP)."""
    from captioner.model import MaskedCrossEntropy, ShowAndTell
    from captioner.quiet_tensorflow import keras
    from captioner.sampled_softmax import SampledSoftmaxTrainer
    from captioner.training import FusedAdam

    parts = set(name.split("+"))
    sampled = next((int(p[len("sampled"):]) for p in parts if p.startswith("sampled")), 0)
    batch = next((int(p[len("batch"):]) for p in parts if p.startswith("batch")), config.batch_size)
    unknown = parts - {"float32", "mixed_bfloat16", "fused-adam", "jit", f"sampled{sampled}", f"batch{batch}"}
    if unknown:
        raise SystemExit(f"unknown variant part(s) {sorted(unknown)}\n{VARIANT_HELP}")
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16" if "mixed_bfloat16" in parts else "float32")
    decoder = ShowAndTell(vocab_size, feature_dim, config.embed_dim, config.units, config.num_layers, config.dropout,
                          config.rnn)
    keras.mixed_precision.set_dtype_policy("float32")
    model = SampledSoftmaxTrainer(decoder, sampled) if sampled else decoder
    learning_rate = config.learning_rate * (batch / config.batch_size) ** 0.5
    optimizer = (FusedAdam if "fused-adam" in parts else keras.optimizers.Adam)(learning_rate,
                                                                                 clipnorm=config.clipnorm)
    model.compile(optimizer=optimizer, loss=MaskedCrossEntropy(0.0 if sampled else config.label_smoothing),
                  jit_compile=jit_compile or "jit" in parts)
    return model, batch


def fixed_batches(features, rows, sequences, vocab, batch_size: int, count: int, seed: int):
    """The first `count` batches of the package's pipeline, as a dataset that replays them in
    order from the start for every `fit`, and the real target tokens and captions of each; every
    variant with this batch size then trains on the same batches."""
    import numpy as np

    from captioner.quiet_tensorflow import tf
    from captioner.training import teacher_forcing_dataset

    source = teacher_forcing_dataset(features, rows, sequences, vocab, batch_size, True, seed).repeat()
    batches = list(source.take(count).as_numpy_iterator())
    tokens = np.array([(target != vocab.pad_id).sum() for _, target in batches], float)
    captions = np.array([len(target) for _, target in batches], float)
    positions = np.array([target.size for _, target in batches], float)
    signature = ((tf.TensorSpec([None, features.shape[1]], tf.float32), tf.TensorSpec([None, None], tf.int32)),
                 tf.TensorSpec([None, None], tf.int32))
    dataset = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=signature).repeat()
    return dataset.prefetch(2), tokens, captions, positions


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        from captioner.quiet_tensorflow import tf

        intra, inter = (int(n) for n in args.threads.split(","))
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    info = machine_info()

    import numpy as np

    from captioner.quiet_tensorflow import keras
    from captioner.training import TrainConfig

    config = TrainConfig.preset("default", **({"batch_size": args.batch_size} if args.batch_size else {}))
    keras.utils.set_random_seed(config.seed)
    vocab, rows, sequences, source = caption_data(config, args.vocab, args.synthetic)
    feature_dim = 1280  # the default encoder's
    features = np.random.default_rng(1).normal(size=(rows.max() + 1, feature_dim)).astype(np.float32)
    V, E, U = len(vocab), config.embed_dim, config.units
    print(f"{source}: {len(rows)} captions, vocabulary {V}; model E={E} U={U} batch {config.batch_size}; "
          f"load average {info['load_average_at_start']}")

    # Every variant does the same work per chunk: as many captions as the reference's steps hold.
    variants = args.variants.split(",")
    chunk_captions = int(args.steps / args.chunks * config.batch_size)
    models, data = {}, {}
    for variant in variants:
        model, batch = build_variant(variant, config, V, feature_dim, args.jit_compile)
        steps = max(1, round(chunk_captions / batch))
        if batch not in data:
            data[batch] = fixed_batches(features, rows, sequences, vocab, batch, steps, config.seed)
        model.fit(data[batch][0], epochs=1, steps_per_epoch=max(steps, args.warmup), verbose=0,
                  shuffle=False)  # traces every shape
        models[variant] = (model, batch, steps)

    # The machine is shared: measure its matmul rate between chunks of training, so each
    # chunk is compared with what the machine delivered around the same time; the variants
    # take turns chunk by chunk, so all see the same machine, and the turn order rotates, so
    # none always runs right after the matmul measurement (which evicts the step's data
    # from the caches).
    lstm = 2 * 4 * (E + U) * U * config.num_layers
    projection = 2 * U * V
    flops_per_token = 3 * (lstm + projection)
    rates = [matmul_gflops(args.matmul_size, repeats=3)["best_gflops"]]
    chunks, by_variant = [], {v: [] for v in variants}
    for chunk in range(args.chunks):
        for variant in variants[chunk % len(variants):] + variants[:chunk % len(variants)]:
            model, batch, steps = models[variant]
            dataset, tokens, captions, positions = data[batch]
            start = time.perf_counter()
            history = model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False).history
            seconds = time.perf_counter() - start
            by_variant[variant].append({"seconds": seconds, "tokens": tokens[:steps].sum(), "loss": history["loss"][-1]})
            if variant != variants[0]:
                continue
            achieved = tokens[:steps].sum() * flops_per_token / seconds / 1e9
            chunks.append({"steps": steps, "seconds": seconds, "tokens": tokens[:steps].sum(),
                           "positions": positions[:steps].sum(), "captions": captions[:steps].sum(),
                           "achieved_gflops": achieved,
                           "loss": history["loss"][-1]})
        rates.append(matmul_gflops(args.matmul_size, repeats=3)["best_gflops"])
        chunks[-1]["matmul_gflops"] = (rates[-2] + rates[-1]) / 2
        chunks[-1]["fraction"] = chunks[-1]["achieved_gflops"] / chunks[-1]["matmul_gflops"]
    speed = {v: sum(c["tokens"] for c in cs) / sum(c["seconds"] for c in cs) for v, cs in by_variant.items()}
    # On a shared host a chunk that another job slowed down drags the totals; each variant's best
    # chunk is its figure with the fewest interruptions.
    best = {v: max(c["tokens"] / c["seconds"] for c in cs) for v, cs in by_variant.items()}

    seconds = sum(c["seconds"] for c in chunks)
    tokens, positions, captions = (sum(c[k] for c in chunks) for k in ("tokens", "positions", "captions"))
    achieved = tokens * flops_per_token / seconds / 1e9
    matmul = float(np.median(rates))
    steps = sum(c["steps"] for c in chunks)
    result = {
        "machine": info,
        "config": {**vars(args), "data": source, "vocab_size": V, "embed_dim": E, "units": U,
                   "batch_size": config.batch_size, "feature_dim": feature_dim},
        "steps": steps, "seconds": seconds, "tokens": tokens, "positions": positions, "captions": captions,
        "padding_fraction": 1 - tokens / positions,
        "tokens_per_s": tokens / seconds, "captions_per_s": captions / seconds,
        "ms_per_step": 1000 * seconds / steps,
        "flops_per_token": {"lstm_forward": lstm, "projection_forward": projection, "total_x3": flops_per_token},
        "achieved_gflops": achieved, "executed_gflops_with_padding": positions * flops_per_token / seconds / 1e9,
        "matmul_gflops": {"interleaved_best_of_3": rates, "median": matmul, "best": max(rates)},
        "fraction_of_matmul_rate": achieved / matmul,
        "fraction_of_best_matmul_rate": achieved / max(rates),
        "chunks": chunks,
        "variants": {v: {"tokens_per_s": speed[v], "vs_reference": speed[v] / speed[variants[0]],
                         "batch_size": models[v][1], "steps_per_chunk": models[v][2],
                         "ms_per_step": 1000 * sum(c["seconds"] for c in by_variant[v]) / (models[v][2] * args.chunks),
                         "chunk_tokens_per_s": [c["tokens"] / c["seconds"] for c in by_variant[v]],
                         "best_chunk_tokens_per_s": best[v], "best_chunk_vs_reference": best[v] / best[variants[0]],
                         "last_loss": by_variant[v][-1]["loss"]} for v in variants},
    }
    print_table([
        {"what": "training step", "tokens/s": result["tokens_per_s"], "captions/s": result["captions_per_s"],
         "ms/step": result["ms_per_step"], "padding": f"{100 * result['padding_fraction']:.1f}%",
         "GFLOP/s": achieved, "of matmul": f"{100 * result['fraction_of_matmul_rate']:.0f}%"},
        {"what": f"matmul {args.matmul_size}^2 float32, median", "GFLOP/s": matmul},
        {"what": f"matmul {args.matmul_size}^2 float32, best", "GFLOP/s": max(rates)},
    ], title=f"Training at the default size, {variants[0]} (load average at start {info['load_average_at_start']})")
    print(f"FLOPs per token: {flops_per_token / 1e6:.1f} M (LSTM {lstm / 1e6:.2f} M + projection "
          f"{projection / 1e6:.2f} M, x3)")
    print("each chunk against the matmul rate around it: "
          + ", ".join(f"{100 * c['fraction']:.0f}%" for c in chunks))
    print_table([{"variant": v, "batch": r["batch_size"], "tokens/s": r["tokens_per_s"], "ms/step": r["ms_per_step"],
                  f"vs {variants[0]}": f"{r['vs_reference']:.2f}x", "best chunk": r["best_chunk_tokens_per_s"],
                  "best vs best": f"{r['best_chunk_vs_reference']:.2f}x", "last loss": r["last_loss"]}
                 for v, r in result["variants"].items()],
                title="Variants, chunk by chunk in this run (sampled losses are not comparable with full ones)")
    write_result("train_throughput", result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
