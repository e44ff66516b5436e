#!/usr/bin/env bash
# Every GPU path in one call, under 8 minutes on one GPU, ending in one table for the README's GPU rows:
#   1. the tests marked gpu (mixed precision, channels-last, half-precision Q_g, views on the device, health);
#   2. the step overhead of MLS over MoCo-v2 and the cost of the health measures at ResNet-50, 224 px, bf16,
#      channels-last, batch 256, the paper's D = 4,096;
#   3. the throughput of the data pipeline and the model step at the same setting (no end-to-end part);
#   4. a two-minute pretraining on the built-in scenes at 224 px with the views made on the device.
#
#   bash benchmarks/gpu_check.sh [OUT]        # OUT: folder of the logs and results (default: gpu_check/)
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh /tmp/x   # a dry run of the script itself on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
if [[ -n "${QUICK:-}" ]]; then  # tiny sizes: checks the script, measures nothing
    STEP=(--arch resnet18 --image-size 32 --batch-size 8 --queue-size 256 --precision fp32 --steps 3 --warmup 1)
    PRE=(--arch resnet18 --image-size 32 --batch-size 8 --num-images 64 --queue-size 32 --max-steps 12 --workers 0)
    THR=(--arch resnet18 --image-size 32 --batch-size 8 --queue-size 256 --precision fp32 --sizes 32 --seconds 0.5
         --steps 6 --skip 2 --jpegs 16)
else
    STEP=(--arch resnet50 --image-size 224 --batch-size 256 --queue-size 4096 --precision bf16 --channels-last
          --steps 15 --warmup 3)
    PRE=(--arch resnet50 --image-size 224 --batch-size 256 --num-images 20000 --queue-size 4096 --max-steps 150
         --precision bf16-mixed --channels-last true --workers 12)
    THR=(--sizes 224)
fi
status=0

echo "== 1. tests marked gpu"
python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/tests.log" | tail -3 || status=1

echo "== 2. step overhead and health measures"
python benchmarks/step_overhead.py --device "$DEVICE" "${STEP[@]}" 2>&1 | tee "$OUT/step_overhead.log" | tail -6 || status=1

echo "== 3. throughput (pipeline and step)"
python benchmarks/throughput.py --device "$DEVICE" --skip-end-to-end "${THR[@]}" > "$OUT/throughput.log" 2>&1 || status=1
tail -12 "$OUT/throughput.log"

echo "== 4. pretraining with the views on the device"
rm -rf "$OUT/pretrain"
start=$(date +%s)
mls pretrain --out "$OUT/pretrain" --epochs 2 --augment-on "$([[ $DEVICE == cuda ]] && echo device || echo cpu)" \
    --log-every 10 "${PRE[@]}" > "$OUT/pretrain.log" 2>&1 || status=1
seconds=$(( $(date +%s) - start ))
grep -E "^(mls pretrain|done|epoch|health)" "$OUT/pretrain.log"

echo "== table"
python - "$OUT" "$seconds" <<'EOF'
import csv, json, pathlib, sys
out, seconds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
def last_json(path):
    lines = [l for l in path.read_text().splitlines() if l.startswith("{")] if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}
step = last_json(out / "step_overhead.log")
tests = (out / "tests.log").read_text().strip().splitlines()[-1] if (out / "tests.log").is_file() else "not run"
rows = [("tests marked gpu", tests)]
if step:
    med = step["median_s"]
    rows += [("setting", step["setting"]),
             ("MoCo-v2 / MLS step", f"{1000 * med['mocov2']:.0f} / {1000 * med['mls']:.0f} ms, "
                                    f"ratio {step['time_ratio']:.3f}x, memory {step['memory_ratio']:.3f}x"),
             ("health measures", f"{100 * step['health_share']:.2f}% of an average step at --log-every 10")]
thr = last_json(out / "throughput.log")
if thr.get("step_images_per_sec"):
    c = thr["step_images_per_sec"]
    rows.append(("model step alone", f"MoCo-v2 {c['mocov2']:.0f}, MLS {c['mls']:.0f} images/s"))
if thr.get("device_views_per_sec"):
    rows.append(("views on the device", f"{thr['device_views_per_sec']:.0f} views/s"))
logs = sorted((out / "pretrain" / "csv").glob("version_*/metrics.csv"))
rates = []
if logs:
    rates = [float(r["train/images_per_sec"]) for r in csv.DictReader(open(logs[-1])) if r.get("train/images_per_sec")]
if rates:
    rows.append(("pretraining, views on the device", f"{seconds} s in all, median {sorted(rates)[len(rates) // 2]:.0f} "
                                                      f"images/s over {len(rates)} logged steps"))
width = max(len(k) for k, _ in rows)
print("\n".join(f"| {k:<{width}} | {v} |" for k, v in rows))
EOF
exit $status
