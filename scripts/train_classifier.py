"""Train the shipped metric classifier for MNIST or Fashion-MNIST and write it to farmer/assets.

python scripts/train_classifier.py --dataset mnist
python scripts/train_classifier.py --dataset fashion-mnist --threads 1
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from farmer.classifier import CLASSIFIER_DATASETS, train_classifier
from farmer.data import prepare_dataset

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dataset", required=True, choices=CLASSIFIER_DATASETS)
parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent.parent / "farmer" / "assets")
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--seed", type=int, default=0)
# On a busy machine one thread is often faster than two (no spinning on a contended core).
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

torch.set_num_threads(args.threads)
print(prepare_dataset(args.dataset))
record = train_classifier(
    args.dataset,
    args.out_dir,
    epochs=args.epochs,
    batch_size=args.batch_size,
    lr=args.lr,
    seed=args.seed,
    device=args.device,
    command=shlex.join(["python", "scripts/train_classifier.py", *sys.argv[1:]]),
)
print(json.dumps(record, indent=2))
