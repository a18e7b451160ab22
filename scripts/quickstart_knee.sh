#!/usr/bin/env bash
# The knee recipe on its embedded demo (run through `bash scripts/quickstart.sh --recipe knee`):
# synthetic knee phantoms by Kellgren-Lawrence grade, a small DINOv2 image tower and a small
# SigLIP text tower built from configs (random weights, no download), trained together with
# the seed's launcher, then batch inference on the test split and one image's ranked queries.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${QUICKSTART_DIR:-runs/quickstart_knee}"
DEMO="${DEMO_DIR:-data/demo_knee}"
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*" >&2; }

step "1. knee phantoms (not patient data) -> $DEMO/knee.csv"
[ -f "$DEMO/knee.csv" ] || python scripts/demo/make_demo_data.py --recipe knee --out_dir "$DEMO" --num_images 600 --image_size 64

step "2. a small DINOv2 (RAD-DINO's architecture) and SigLIP built from configs (random weights)"
python - "$DEMO/knee.csv" "$OUT/tiny" <<'PY'
import csv, sys
from scripts.demo.make_tiny_models import build_tiny_dinov2, build_tiny_siglip
texts = [r["impression"] for r in csv.DictReader(open(sys.argv[1]))]
build_tiny_dinov2(f"{sys.argv[2]}/dino", image_size=64, patch_size=8)
build_tiny_siglip(f"{sys.argv[2]}/siglip", texts, image_size=64, hidden_size=64, num_layers=2, num_heads=2)
PY

step "3. the seed's training: image tower + text tower + new heads, learnable temperature and bias"
# Both towers train here: a random text tower, frozen, would give every impression the same
# embedding (a pretrained one would not need it).
IMAGE_MODEL_NAME="$OUT/tiny/dino" TEXT_MODEL_NAME="$OUT/tiny/siglip" CSV_FILE="$DEMO/knee.csv" \
OUTPUT_DIR="$OUT/train" IMAGE_SIZE=64 BATCH_SIZE=32 LEARNING_RATE=2e-3 EPOCHS=14 WARMUP_RATIO=0.1 \
MIXED_PRECISION=no REPORT_TO=none NUM_WORKERS=1 FREEZE_FLAGS="--no_freeze_text_encoder" \
    bash scripts/run_knee_raddino.sh --no-save_epoch_models --logging_steps 50

step "4. batch inference on the held-out test split -> $OUT/test_predictions.csv"
python Stage0/inference_stage0.py --model_path "$OUT/train/best_model" --csv_path "$DEMO/knee.csv" \
    --split test --output_path "$OUT/test_predictions.csv" 2> "$OUT/inference.log"
python - "$OUT" <<'PY' | tee "$OUT/knee_table.md"
import csv, json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/train/metrics.jsonl") if "val/loss" in l]
best = json.load(open(f"{out}/train/best_model/val_metrics.json"))
pred = list(csv.DictReader(open(f"{out}/test_predictions.csv")))
print("| knee recipe (small towers, synthetic images) | untrained | best_model |\n|---|---|---|")
print(f"| val loss | {rows[0]['val/loss']:.3f} | {best['loss']:.3f} |")
print(f"| val accuracy, image -> impression | {rows[0]['val/acc_i2t']:.3f} | {best['acc_i2t']:.3f} |")
print(f"| val accuracy, impression -> image | {rows[0]['val/acc_t2i']:.3f} | {best['acc_t2i']:.3f} |")
PY
grep "top-1 accuracy" "$OUT/inference.log" | sed 's/^INFO /test split: /'

step "5. one held-out image, ranked queries"
IMG="$(python -c "import csv; print(next(r['img_path'] for r in csv.DictReader(open('$DEMO/knee.csv')) if r['split'] == 'test' and r['kl_grade'] == '4'))")"
python -c "import csv; r = next(r for r in csv.DictReader(open('$DEMO/knee.csv')) if r['img_path'] == '$IMG'); print('image: $DEMO/' + r['img_path'] + '\nreference: ' + r['impression'])"
python Stage0/inference_stage0.py --model_path "$OUT/train/best_model" --image_path "$DEMO/$IMG" \
    --queries "Normal knee X-ray." "Mild OA of the knee." "Severe OA of the knee." \
              "Severe OA of the knee with varus angulation." 2>/dev/null
