"""Evaluate a trained run or shipped model on MNIST: test bits/dim on all 10,000 test images (EMA weights,
uniform dequantisation) and sample metrics of class-balanced samples, unguided and with resampling CFG
(w = 2.5): classifier score, Fréchet distance in the shipped classifier's features, class accuracy, and the
stripe statistic (docs/quality.md). Writes OUT.json and OUT.{unguided,cfg2.5}.png.

    python scripts/evaluate_run.py farmer/checkpoints/mnist runs/eval/mnist 1000
"""

import argparse
import json
import time

import torch

from farmer.checkpoint import load_model
from farmer.classifier import classifier_metrics
from farmer.data import make_dataset, model_to_pixels
from farmer.evaluation import dataset_pixels, evaluate_bpd
from farmer.guidance import ResamplingGuidance
from farmer.images import save_grid
from farmer.metrics import stripe_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out", help="output prefix")
    parser.add_argument("n", type=int, help="samples per setting (a multiple of 10)")
    args = parser.parse_args()

    model = load_model(args.checkpoint).eval()
    result = {"checkpoint": args.checkpoint,
              "bpd_ema": evaluate_bpd(model, make_dataset("mnist", "test", None, 28))}
    reference = dataset_pixels("mnist", "test", args.n, 28)
    labels = torch.arange(args.n) % 10
    for name, guidance in (("unguided", None), ("cfg2.5", ResamplingGuidance(scale=2.5))):
        start = time.time()
        generator = torch.Generator().manual_seed(0)
        pixels = torch.cat([model_to_pixels(model.sample(250, labels[i:i + 250], generator, guidance=guidance))
                            for i in range(0, args.n, 250)])
        metrics = classifier_metrics(pixels, "mnist", labels)
        metrics["stripe_ratio"] = stripe_ratio(pixels, reference, model.config.patch_size)
        metrics["seconds"] = time.time() - start
        result[name] = metrics
        order = torch.argsort(labels[:100], stable=True)
        save_grid(pixels[:100][order], f"{args.out}.{name}.png", nrow=10, scale=2)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
