"""Plot a run's metrics.jsonl: training loss in bits (train_bits) and test bits/dim against steps and wall-clock time.

    python scripts/plot_metrics.py runs/mnist --out docs/mnist_training.png
"""

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN/training.png)")
    args = parser.parse_args()

    run = Path(args.run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"{run / 'metrics.jsonl'} has no records")
    start = records[0]["time"]
    train = [r for r in records if "train_bits" in r]
    test = [r for r in records if "test_bpd" in r]

    fig = Figure(figsize=(10, 4), layout="constrained")
    by_step, by_time = fig.subplots(1, 2)
    # train_bits is the loss under the run's dequantisation (no bound under Gaussian noise); test_bpd is the bound.
    by_step.plot([r["step"] for r in train], [r["train_bits"] for r in train], lw=0.8, label="train loss (bits)")
    by_step.plot([r["step"] for r in test], [r["test_bpd"] for r in test], "o-", label="test (uniform, EMA)")
    by_step.set(xlabel="step", ylabel="bits/dim", title=run.name)
    by_step.legend()
    minutes = [(r["time"] - start) / 60 for r in test]
    by_time.plot(minutes, [r["test_bpd"] for r in test], "o-", color="C1")
    for m, r in zip(minutes, test, strict=True):
        by_time.annotate(f"{r['test_bpd']:.2f}", (m, r["test_bpd"]), fontsize=7, textcoords="offset points",
                         xytext=(0, 5), ha="center")
    by_time.set(xlabel="wall-clock minutes", ylabel="test bits/dim", title="test bits/dim over time")
    out = Path(args.out) if args.out else run / "training.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
