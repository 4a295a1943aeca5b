#!/usr/bin/env bash
# What the issues ask of a lent GPU machine (one H100 or H200, ~15 minutes in all), as prepared parts of under
# ten minutes each, run from the repository root:
#   scripts/gpu_session.sh pack    # here, before the lease: MNIST gzipped into .gpu-data/ (git-ignored; carry it)
#   scripts/gpu_session.sh bench   # there: the benchmark table in bf16 with torch.compile, and the train step of
#                                  # imagenet256-1.1b-p16 (images/s, fraction of the measured bf16 matmul peak)
#   scripts/gpu_session.sh train   # there: the MNIST likelihood recipe in bf16 at batch 256 for ~4 minutes;
#                                  # images/s, test bits/dim on all 10,000 test images, a CFG grid, the weights
#   scripts/gpu_session.sh scale   # there (issue #25): `farmer plan` for every ImageNet preset; the 1.1B-p16
#                                  # train step's images/s and peak memory on one GPU, fp32 vs the bf16 policy; the
#                                  # mixture's memory; bf16 vs fp32 on the shipped likelihood model (bits/dim,
#                                  # round trip, CFG accuracy); packed shards vs JPEGs per loader worker
# Results go to $OUT (default gpu-out), at most 8 files (the device tool's limit). SMOKE=1 runs the same steps
# on the CPU at toy sizes in about a minute, to check the script before a lease.
set -euo pipefail
part=${1:?usage: scripts/gpu_session.sh pack|bench|train|scale}
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
farmer() { python3 -m farmer.cli "$@"; }
if [ "${SMOKE:-0}" = 1 ]; then
  device=cpu preset=tiny data=digits batch=16 big=tiny big_batch=4 seconds=15 probe_steps=20 quick=--quick
  sample_model=() precision_study=(--bpd-images 64 --samples 20 --round-trip-images 8) data_bench=(--images 128 --batches 1 --workers 1)
  mixture=(--quick --batch-sizes 1)
else
  device=cuda preset=mnist data=mnist batch=256 big=imagenet256-1.1b-p16 big_batch=32 seconds=240 probe_steps=60 quick=
  sample_model=(--checkpoint farmer/checkpoints/mnist) precision_study=() data_bench=(--images 2000 --workers 1 4 8) mixture=()
fi

case $part in
pack)
  mkdir -p .gpu-data/mnist
  for f in "${FARMER_DATA:-$HOME/.cache/farmer/data}"/mnist/*-ubyte; do
    gzip -c "$f" > ".gpu-data/mnist/$(basename "$f").gz"
  done
  mkdir -p .git/info && { grep -qsx '/.gpu-data/' .git/info/exclude || echo '/.gpu-data/' >> .git/info/exclude; }
  du -sh .gpu-data ;;
bench)
  [ "$device" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  python3 -m benchmarks.run_all --device "$device" --compile $quick --train-presets "$preset" \
    --sample-preset "$preset" "${sample_model[@]}" --out "$out/bench" 2>&1 | tee "$out/bench.log"
  python3 -m benchmarks.bench_train --device "$device" --quick --presets "$big" --batch-size "$big_batch" \
    --out "$out/big" ;;
train)
  run=$(mktemp -d)
  recipe=(--preset "$preset" --data "$data" --data-root .gpu-data --device "$device" --batch-size "$batch"
          --set channel_mixing=true --set redundant_mixture=per_token --set dequantization=uniform)
  # Calibrate: a short run measures images/s, and the real run's cosine schedule ends in $seconds.
  farmer train "${recipe[@]}" --out "$run/probe" --steps "$probe_steps" --eval-every 100000 --sample-every 100000
  steps=$(python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; r=[x for x in r if 'images_per_s' in x]; \
print(max(100, int(float(sys.argv[2]) * r[-1]['images_per_s'] / int(sys.argv[3]))))" \
    "$run/probe/metrics.jsonl" "$seconds" "$batch")
  echo "training $steps steps of $batch"
  farmer train "${recipe[@]}" --out "$run/mnist" --steps "$steps" --warmup-steps $((steps / 20)) \
    --eval-every $((steps / 4)) --sample-every "$steps" --save-every $((steps / 4)) 2>&1 | tr '\r' '\n' \
    | grep -v '%|' > "$out/train.log"
  farmer eval bpd --checkpoint "$run/mnist" --data "$data" --data-root .gpu-data --split test --device "$device" \
    --json "$out/bpd.json"
  farmer sample --checkpoint "$run/mnist" --classes 0-9 --n 100 --guidance 2.5 --device "$device" \
    --out "$out/samples-cfg.png"
  python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; v=[x['images_per_s'] for x in r \
if 'images_per_s' in x][len(r) // 20:]; print(f'{sorted(v)[len(v) // 2]:.0f} images/s (median of the logged steps)')" \
    "$run/mnist/metrics.jsonl" | tee -a "$out/train.log"
  step=$(cat "$run/mnist/LATEST")
  tar -C "$run/mnist" -czf "$out/run.tar.gz" LATEST metrics.jsonl "$step/config.json" "$step/ema.safetensors"
  cat "$out/bpd.json" ;;
scale)
  [ "$device" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/scale.log"
  farmer plan --all --json "$out/plan.json" 2>&1 | tee -a "$out/scale.log"
  python3 -m benchmarks.bench_train --device "$device" --quick --presets "$big" --batch-size "$big_batch" \
    --precisions fp32 bf16 --out "$out/scale" 2>&1 | tee -a "$out/scale.log"
  python3 -m benchmarks.bench_mixture_memory --device "$device" "${mixture[@]}" --out "$out/scale" 2>&1 \
    | tee -a "$out/scale.log"
  python3 -m benchmarks.bench_precision --device "$device" --checkpoint mnist-likelihood "${precision_study[@]}" \
    --out "$out/scale" 2>&1 | tee -a "$out/scale.log"
  python3 -m benchmarks.bench_data "${data_bench[@]}" --out "$out/scale" 2>&1 \
    | tee -a "$out/scale.log"
  tar -C "$out" -czf "$out/scale-results.tar.gz" scale && rm -r "$out/scale" ;;
*)
  echo "unknown part $part: pack, bench, train or scale" >&2
  exit 2 ;;
esac
