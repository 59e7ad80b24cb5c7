"""Where one float32 training step of the default model spends its time.

The step is the package's: `ShowAndTell` at `TrainConfig.preset("default")` sizes (E 512, U 512,
one LSTM layer, dropout 0.5), `MaskedCrossEntropy` with the preset's label smoothing, Adam with
clipping. One fixed batch of random ids (64 captions of `--length` inputs; Flickr8k's buckets
hold 10-16) and random image features: the values do not change the arithmetic.

Each piece runs alone in its own `tf.function`, forward and backward, so its time, FLOPs and
fraction of the machine's float32 matmul rate (measured in the same run, between pieces) can be
read side by side:

- the whole step (forward, loss, gradients, Adam), as `model.fit` runs it;
- the LSTM over the sequence, forward + backward (gates: 2*4*(E+U)*U FLOPs a position, x3);
- the vocabulary projection + softmax cross-entropy, forward + backward (2*U*V a position, x3),
  and the same with a sampled softmax (`tf.nn.sampled_softmax_loss`, `--sampled` words);
- Adam's update of every weight, with clipping (element-wise), Keras's and the fused one;
- the input pipeline (`teacher_forcing_dataset`: bucketing, feature gather), batches/s alone;
- plain matmuls of the LSTM's per-word shape and of the projection's, for what these sizes can reach.

`--trace DIR` also records a TensorFlow profiler trace of `--trace-steps` `fit` steps and prints
the ops with the most self-time (summed over threads).

    python bench/train_profile.py
    python bench/train_profile.py --trace /tmp/trace --repeats 30
"""
from __future__ import annotations

import argparse
import collections
import sys
import time

from common import machine_info, matmul_gflops, print_table, write_result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, help="captions per step (default: the default preset's)")
    p.add_argument("--length", type=int, default=14, help="input positions per caption")
    p.add_argument("--vocab", type=int, default=2538, help="vocabulary size (Flickr8k's at min_count 5)")
    p.add_argument("--sampled", type=int, default=1024, help="sampled words for the sampled-softmax piece")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per piece (the median is reported)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all pieces, matmul rate measured between")
    p.add_argument("--trace", metavar="DIR", help="also write a TF profiler trace of fit steps here")
    p.add_argument("--trace-steps", type=int, default=10)
    p.add_argument("--output", metavar="FILE", help="result JSON (default bench/results/train_profile.json)")
    return p.parse_args(argv)


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` (which must block until its work is done) over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def top_ops(trace_dir: str, n: int = 20) -> list[dict]:
    """Self-time per TensorFlow op in the newest trace under `trace_dir`, summed over the host
    threads: an op's time minus that of the ops nested inside it on the same thread (a while
    loop's body, a function call). Op events are named "scope/name:Type"; the others (the
    executor, tf.data, Python) are left out. Ops are named by their last two scopes and type."""
    from pathlib import Path

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = max(Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    space = xplane_pb2.XSpace()
    space.ParseFromString(path.read_bytes())
    self_ps: dict[str, int] = collections.Counter()
    count: dict[str, int] = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            events = sorted(((e.offset_ps, e.duration_ps, short_name(plane.event_metadata[e.metadata_id].name))
                             for e in line.events if is_op(plane.event_metadata[e.metadata_id].name)),
                            key=lambda e: (e[0], -e[1]))
            stack: list[list] = []  # [end, name, self time]
            for start, duration, name in events:
                while stack and stack[-1][0] <= start:
                    end, done, own = stack.pop()
                    self_ps[done] += own
                if stack:
                    stack[-1][2] -= duration
                stack.append([start + duration, name, duration])
                count[name] += 1
            for _, done, own in stack:
                self_ps[done] += own
    total = sum(self_ps.values())
    return [{"op": name, "self_ms": ps / 1e9, "share": ps / total, "calls": count[name]}
            for name, ps in self_ps.most_common(n)]


def is_op(event: str) -> bool:
    """Whether a trace event is a TensorFlow op ("scope/name:Type", not "Executor::Run" or
    "EagerLocalExecute: <function>")."""
    return ":" in event and "::" not in event and ": " not in event


def short_name(event: str) -> str:
    """"a/b/while/body/_42/c/d/MatMul_grad/MatMul:_MklMatMul" -> "(while) MatMul_grad/MatMul:_MklMatMul"
    plus what it belongs to: the step's gradient, the LSTM's loop, the optimizer."""
    scope, _, kind = event.rpartition(":")
    parts = scope.split("/")
    where = ["backward" if "gradient_tape" in scope else "forward" if "show_and_tell" in scope else "",
             "LSTM loop" if "/while" in scope else "", "Adam" if scope.split("/")[1:2] == ["adam"] else ""]
    return f"{' '.join(w for w in where if w) or '-'}: {'/'.join(parts[-2:])}:{kind}"


def main(argv=None) -> int:
    args = parse_args(argv)
    info = machine_info()

    import numpy as np

    from captioner.model import MaskedCrossEntropy, ShowAndTell
    from captioner.quiet_tensorflow import keras, tf
    from captioner.text import SPECIAL_TOKENS, Vocabulary
    from captioner.training import FusedAdam, TrainConfig, teacher_forcing_dataset

    config = TrainConfig.preset("default", **({"batch_size": args.batch_size} if args.batch_size else {}))
    keras.utils.set_random_seed(config.seed)
    B, T, V, E, U, D = config.batch_size, args.length, args.vocab, config.embed_dim, config.units, 1280
    rng = np.random.default_rng(0)
    features = tf.constant(rng.normal(size=(B, D)).astype(np.float32))
    tokens = tf.constant(rng.integers(len(SPECIAL_TOKENS), V, (B, T)).astype(np.int32))
    targets = tf.constant(rng.integers(len(SPECIAL_TOKENS), V, (B, T)).astype(np.int32))

    model = ShowAndTell(V, D, E, U, config.num_layers, config.dropout, config.rnn)
    loss_fn = MaskedCrossEntropy(config.label_smoothing)
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate, clipnorm=config.clipnorm), loss=loss_fn)
    variables = model.trainable_variables
    rnn, head = model.rnns[0], model.head

    @tf.function
    def whole_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(targets, model((features, tokens), training=True))
        model.optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    x = tf.constant(rng.normal(size=(B, T, E)).astype(np.float32))
    h0 = [tf.constant(rng.normal(size=(B, U)).astype(np.float32)) for _ in range(2)]
    upstream = tf.constant(rng.normal(size=(B, T, U)).astype(np.float32))

    @tf.function
    def lstm_step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = rnn(x, initial_state=h0, training=True)[0]
            loss = tf.reduce_sum(y * upstream)
        return tape.gradient(loss, [x, *rnn.trainable_variables])

    hidden = tf.constant(rng.normal(size=(B, T, U)).astype(np.float32))

    @tf.function
    def projection_step():
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            loss = loss_fn(targets, head(hidden))
        return tape.gradient(loss, [hidden, *head.trainable_variables])

    real = targets != 0
    labels = tf.cast(tf.boolean_mask(targets, real), tf.int64)[:, None]

    @tf.function
    def sampled_projection_step():  # what captioner.sampled_softmax trains with instead
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            loss = tf.reduce_mean(tf.nn.sampled_softmax_loss(
                tf.transpose(head.kernel), head.bias, labels, tf.boolean_mask(hidden, real), args.sampled, V))
        return tape.gradient(loss, [hidden, *head.trainable_variables])

    gradients = [tf.constant(rng.normal(size=v.shape).astype(np.float32) * 1e-3) for v in variables]
    fused = FusedAdam(config.learning_rate, clipnorm=config.clipnorm)
    fused.build(variables)

    @tf.function
    def adam_step():
        model.optimizer.apply(gradients, variables)

    @tf.function
    def fused_adam_step():
        fused.apply(gradients, variables)

    @tf.function
    def lstm_word_matmul():  # one word's gates: [B, E+U] x [E+U, 4U], as the cell runs it (two products)
        return tf.reduce_sum(tf.matmul(x[:, 0], rnn.cell.kernel) + tf.matmul(h0[0], rnn.cell.recurrent_kernel))

    @tf.function
    def projection_matmul():  # all positions at once: [B*T, U] x [U, V]
        return tf.reduce_sum(tf.matmul(tf.reshape(hidden, (-1, U)), head.kernel))

    # The input pipeline alone, on random captions of Flickr8k-like lengths.
    vocab = Vocabulary([*SPECIAL_TOKENS, *(f"w{i}" for i in range(V - len(SPECIAL_TOKENS)))])
    words = np.clip(np.rint(rng.normal(11.8, 3.9, 30000)), 1, config.max_len).astype(int)
    sequences = np.zeros((len(words), words.max() + 2), np.int32)
    for i, n in enumerate(words):
        sequences[i, : n + 2] = [vocab.start_id, *rng.integers(len(SPECIAL_TOKENS), V, n), vocab.end_id]
    pipeline = iter(teacher_forcing_dataset(rng.normal(size=(6000, D)).astype(np.float32),
                                            np.repeat(np.arange(6000, dtype=np.int32), 5), sequences, vocab,
                                            B, True, config.seed).repeat())

    def pipeline_batches(n: int = 20):
        for _ in range(n):
            next(pipeline)

    positions = B * T
    lstm_flops = 3 * 2 * 4 * (E + U) * U * positions
    projection_flops = 3 * 2 * U * V * positions
    n_params = sum(int(np.prod(v.shape)) for v in variables)
    pieces = {
        "whole step (forward, loss, gradients, Adam)": (lambda: whole_step().numpy(), lstm_flops + projection_flops),
        "LSTM over the sequence, forward + backward": (lambda: lstm_step()[0].numpy(), lstm_flops),
        "projection + softmax cross-entropy, fwd + bwd": (lambda: projection_step()[0].numpy(), projection_flops),
        f"projection + sampled softmax ({args.sampled} words), fwd + bwd": (
            lambda: sampled_projection_step()[0].numpy(), projection_flops * (args.sampled + 1) / V),
        f"Adam update with clipping ({n_params / 1e6:.2f} M weights)": (lambda: adam_step(), None),
        "the same, fused (captioner.training.FusedAdam)": (lambda: fused_adam_step(), None),
        "input pipeline, one batch": (lambda: pipeline_batches(1), None),
        f"one word's gate matmuls [{B},{E}+{U}]x[{E + U},{4 * U}]": (lambda: lstm_word_matmul().numpy(),
                                                                     2 * B * (E + U) * 4 * U),
        f"projection matmul [{positions},{U}]x[{U},{V}]": (lambda: projection_matmul().numpy(), 2 * positions * U * V),
    }
    for fn, _ in pieces.values():  # trace and warm up
        for _ in range(3):
            fn()

    rates = [matmul_gflops(repeats=3)["best_gflops"]]
    seconds = {name: [] for name in pieces}
    for _ in range(args.rounds):
        for name, (fn, _) in pieces.items():
            seconds[name].append(median_seconds(fn, args.repeats))
        rates.append(matmul_gflops(repeats=3)["best_gflops"])
    matmul = float(np.median(rates))
    whole = min(seconds[next(iter(pieces))])
    rows = []
    for name, (_, flops) in pieces.items():
        s = min(seconds[name])  # the best round: the least disturbed by the other jobs on the host
        rows.append({"what": name, "ms": 1000 * s, "of step": f"{100 * s / whole:.0f}%",
                     "GFLOP": flops / 1e9 if flops else None,
                     "GFLOP/s": flops / s / 1e9 if flops else None,
                     "of matmul": f"{100 * flops / s / 1e9 / matmul:.0f}%" if flops else None,
                     "ms by round": [round(1000 * t, 1) for t in seconds[name]]})
    print_table(rows, ["what", "ms", "of step", "GFLOP", "GFLOP/s", "of matmul"],
                title=f"One training step, batch {B} x {T} positions, V={V} E={E} U={U} "
                      f"(load average at start {info['load_average_at_start']}; matmul {matmul:.0f} GFLOP/s)")

    trace = None
    if args.trace:
        dataset = tf.data.Dataset.from_tensors(((features, tokens), targets)).repeat()
        model.fit(dataset, steps_per_epoch=3, verbose=0)
        tf.profiler.experimental.start(args.trace)
        model.fit(dataset, steps_per_epoch=args.trace_steps, verbose=0)
        tf.profiler.experimental.stop()
        trace = top_ops(args.trace)
        print_table([{**r, "share": f"{100 * r['share']:.1f}%"} for r in trace],
                    title=f"Top ops by self-time over {args.trace_steps} fit steps (host threads summed)")

    write_result("train_profile", {
        "machine": info,
        "config": {**vars(args), "batch_size": B, "embed_dim": E, "units": U, "feature_dim": D},
        "matmul_gflops": {"interleaved_best_of_3": rates, "median": matmul},
        "pieces": rows, "top_ops": trace,
    }, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
