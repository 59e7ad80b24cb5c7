"""Plot a training run's history.csv (loss and dev BLEU per epoch) to a PNG.

    python scripts/plot_history.py runs/f8k/history.csv docs/training/default_curves.png
"""
from __future__ import annotations

import argparse
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("history")
    parser.add_argument("output")
    args = parser.parse_args()
    with open(args.history, newline="") as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("loss", "train"), ("val_loss", "dev")):
        left.plot(epochs, [float(r[key]) for r in rows], marker="o", label=label)
    left.set(xlabel="epoch", ylabel="masked cross-entropy", title="Loss (teacher forcing)")
    left.legend()
    for key, label in (("val_bleu1", "BLEU-1"), ("val_bleu4", "BLEU-4")):
        if key in rows[0]:
            right.plot(epochs, [float(r[key]) for r in rows], marker="o", label=label)
    right.set(xlabel="epoch", ylabel="corpus BLEU (%)", title="Dev BLEU, greedy, free-running")
    right.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)


if __name__ == "__main__":
    main()
