#!/usr/bin/env bash
# Every number in the README's results table, from the shipped checkpoint. Writes farmer/checkpoints/mnist/eval/*.json
# and farmer/checkpoints/mnist/metrics.json. About 20-30 minutes on 2 CPU cores (FID's Inception passes dominate).
set -euo pipefail
ckpt=${1:-farmer/checkpoints/mnist}
out=$ckpt/eval
mkdir -p "$out"
farmer eval bpd --checkpoint "$ckpt" --data mnist --split test --json "$out/bpd.json"
farmer eval classifier --checkpoint "$ckpt" --n 1000 --json "$out/classifier-unguided.json"
farmer eval classifier --checkpoint "$ckpt" --n 1000 --variance-scale 0.9 --temperature 1.3 --json "$out/classifier-decoupled.json"
farmer eval classifier --checkpoint "$ckpt" --n 1000 --guidance 2.5 --cfg naive --json "$out/classifier-cfg-naive.json"
farmer eval classifier --checkpoint "$ckpt" --n 1000 --guidance 2.5 --json "$out/classifier-cfg.json"
farmer eval classifier --checkpoint "$ckpt" --n 1000 --guidance 2.5 --inverse distilled --json "$out/classifier-cfg-distilled.json"
farmer eval fid --checkpoint "$ckpt" --n 500 --guidance 2.5 --reference-images 1000 --json "$out/fid-cfg.json"
farmer eval distill --checkpoint "$ckpt" --n 1000 --data mnist --json "$out/distill.json"
farmer eval ood --checkpoint "$ckpt" --in-data mnist --ood-data fashion-mnist --n 2000 --json "$out/ood.json"
python - "$ckpt" <<'PY'
import json, sys
from pathlib import Path
ckpt = Path(sys.argv[1])
results = {p.stem: json.loads(p.read_text()) for p in sorted((ckpt / "eval").glob("*.json"))}
metrics = {"test_bits_per_dim": results["bpd"]["bits_per_dim"], "evaluations": results}
(ckpt / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
print(json.dumps({k: v for k, v in metrics.items() if k != "evaluations"}))
PY
