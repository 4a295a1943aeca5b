"""Evaluate a trained run or shipped model on MNIST: test bits/dim on all 10,000 test images (EMA weights,
uniform dequantisation) and sample metrics of class-balanced samples, unguided and with resampling CFG
(w = 2.5): classifier score, Fréchet distance in the shipped classifier's features, class accuracy, and the
stripe statistic (docs/quality.md). Writes OUT.json and OUT.{unguided,cfg2.5}.png.

    python scripts/evaluate_run.py farmer/checkpoints/mnist runs/eval/mnist 1000

``--data`` evaluates a model of another data set (classifier metrics are null where farmer.classifier has no
classifier for it, e.g. the 8×8 digits); ``--bpd-images`` limits bits/dim to the first test images (quick
checks; the default is the whole test set).
"""

import argparse
import json
import time

import torch

from farmer.analysis import has_classifier
from farmer.checkpoint import load_model
from farmer.classifier import classifier_metrics
from farmer.data import make_dataset
from farmer.evaluation import balanced_labels, dataset_pixels, evaluate_bpd, generate
from farmer.guidance import ResamplingGuidance
from farmer.images import save_grid
from farmer.metrics import stripe_ratio
from farmer.sampling import SamplingOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out", help="output prefix")
    parser.add_argument("n", type=int, help="samples per setting, class-balanced")
    parser.add_argument("--data", default="mnist", help="the model's data set (default: mnist)")
    parser.add_argument("--bpd-images", type=int, default=None, help="test images for bits/dim (default: all)")
    args = parser.parse_args()

    model = load_model(args.checkpoint).eval()  # EMA weights
    size = model.config.image_size
    test_set = make_dataset(args.data, "test", None, size)
    result = {"checkpoint": args.checkpoint, "bpd_ema": evaluate_bpd(model, test_set, max_images=args.bpd_images)}
    reference = dataset_pixels(args.data, "test", args.n, size)
    labels = balanced_labels(model, args.n)
    scored = has_classifier(model, args.data)
    for name, guidance in (("unguided", None), ("cfg2.5", ResamplingGuidance(scale=2.5))):
        start = time.time()
        pixels = generate(model, args.n, labels, SamplingOptions(guidance=guidance, batch_size=250, seed=0))
        metrics = classifier_metrics(pixels, args.data, labels) if scored else {
            "classifier_score": None, "frechet_distance": None, "num_images": float(args.n), "accuracy": None}
        metrics["stripe_ratio"] = stripe_ratio(pixels, reference, model.config.patch_size)
        metrics["seconds"] = time.time() - start
        result[name] = metrics
        order = torch.argsort(labels[:100], stable=True) if labels is not None else slice(None)
        save_grid(pixels[:100][order], f"{args.out}.{name}.png", nrow=10, scale=2)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
