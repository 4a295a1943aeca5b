#!/usr/bin/env bash
# Every number of a shipped model in the README's results table, from the shipped checkpoint itself:
#   scripts/evaluate_shipped.sh farmer/checkpoints/mnist [mnist|fashion-mnist]
# Writes CKPT/eval/*.json and CKPT/metrics.json. About 30 minutes on 2 CPU cores (FID's Inception passes dominate;
# the reference features are cached under the data root, so a second model costs about half). FID_SAMPLES=0 skips FID.
set -euo pipefail
ckpt=${1:-farmer/checkpoints/mnist}
data=${2:-mnist}
ood=$([ "$data" = mnist ] && echo fashion-mnist || echo mnist)
out=$ckpt/eval
mkdir -p "$out"
student=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['model']['distilled_inverse'])" "$ckpt/config.json")
farmer eval bpd --checkpoint "$ckpt" --data "$data" --split test --json "$out/bpd.json"
farmer eval classifier --checkpoint "$ckpt" --data "$data" --n 1000 --json "$out/classifier-unguided.json"
farmer eval classifier --checkpoint "$ckpt" --data "$data" --n 1000 --guidance 2.5 --json "$out/classifier-cfg.json"
if [ "$student" = True ]; then
  farmer eval classifier --checkpoint "$ckpt" --data "$data" --n 1000 --guidance 2.5 --inverse distilled \
    --json "$out/classifier-cfg-distilled.json"
  farmer eval distill --checkpoint "$ckpt" --n 1000 --data "$data" --json "$out/distill.json"
fi
# FID at 2,000 samples against 2,000 test images, with 2,000 training images against the same reference beside it.
fid=${FID_SAMPLES:-2000}
if [ "$fid" -gt 0 ]; then
  farmer eval fid --checkpoint "$ckpt" --data "$data" --n "$fid" --guidance 2.5 --reference-images "$fid" \
    --precision-recall-images "$fid" --json "$out/fid-cfg.json"
fi
farmer eval ood --checkpoint "$ckpt" --in-data "$data" --ood-data "$ood" --n 2000 --json "$out/ood.json"
python - "$ckpt" <<'PY'
import json, sys
from pathlib import Path
ckpt = Path(sys.argv[1])
results = {p.stem: json.loads(p.read_text()) for p in sorted((ckpt / "eval").glob("*.json"))}
metrics = {"test_bits_per_dim": results["bpd"]["bits_per_dim"], "evaluations": results}
(ckpt / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
print(json.dumps({k: v for k, v in metrics.items() if k != "evaluations"}))
PY
