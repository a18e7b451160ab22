#!/usr/bin/env bash
# Installs what is missing into .venv, then runs the main job on the embedded demo data:
# synthetic chest X-ray phantoms with known findings and small SigLIP / Gemma3 models built
# from configs (random init, no download). CPU is enough; about 9 minutes on 2 cores.
#   bash scripts/quickstart.sh                 # CXR: Stage0, Stage1, Stage2, evaluation, inference
#   bash scripts/quickstart.sh --recipe knee   # knee X-ray recipe (seed 003): DINOv2 + SigLIP text, ~1 min
#   bash scripts/quickstart.sh --recipe medgemma  # Stage2 --base_vlm on a tiny MedGemma-shaped model
set -euo pipefail
RECIPE=cxr
while [ $# -gt 0 ]; do
    case "$1" in
        --recipe) RECIPE="$2"; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (use --recipe cxr|knee|medgemma)" >&2; exit 2 ;;
    esac
done
source "$(dirname "$0")/env.sh"
ensure_venv
cd "$REPO_ROOT"
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1 WANDB_MODE=disabled
if [ "$RECIPE" = knee ]; then exec bash scripts/quickstart_knee.sh; fi
if [ "$RECIPE" = medgemma ]; then exec bash scripts/quickstart_medgemma.sh; fi
[ "$RECIPE" = cxr ] || { echo "unknown recipe $RECIPE (cxr, knee or medgemma)" >&2; exit 2; }

OUT="${QUICKSTART_DIR:-runs/quickstart}"
DEMO="${DEMO_DIR:-data/demo}"
EPOCHS_PRETRAIN="${EPOCHS_PRETRAIN:-8}"
EPOCHS_STAGE0="${EPOCHS_STAGE0:-10}"
COMMON=(--num_workers 1 --no-save_epoch_models --logging_steps 25)
export NUM_GPUS=1 MIXED_PRECISION=no REPORT_TO=none BATCH_SIZE=32
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*" >&2; }

step "1. demo data: synthetic phantoms (not patient data) -> $DEMO"
[ -f "$DEMO/stage2_test.json" ] || python scripts/demo/make_demo_data.py --out_dir "$DEMO"

step "2. small SigLIP and Gemma3 built from configs (random weights, no download); the Gemma3 is
    trained briefly on the demo texts as a stand-in for a pretrained LLM"
python scripts/demo/make_tiny_models.py --out_dir "$OUT/tiny" --image_size 64 --lm_pretrain_steps 300 \
    --texts "$DEMO/stage0_train.json" "$DEMO/stage2_train.json"

step "3a. stand-in for a pretrained SigLIP: train the small one jointly (both towers)"
MODEL_NAME="$OUT/tiny/siglip" TRAIN_JSON="$DEMO/pretrain_train.json" VAL_JSON="$DEMO/stage0_val.json" \
IMAGE_ROOT="$DEMO" OUTPUT_DIR="$OUT/pretrain" LEARNING_RATE=2e-3 NUM_EPOCHS="$EPOCHS_PRETRAIN" \
FREEZE_FLAGS="--no_freeze_text_encoder --no_freeze_logit_scale" \
    bash Stage0/run_train_vision_encoder_stage0.sh "${COMMON[@]}" --duplicate_captions negative
# (--duplicate_captions negative: the paper's loss, as real SigLIPs were pretrained on unique web
# captions; the fine-tune below, like every Stage0 run by default, counts repeated captions positive.)

step "3b. Stage0 as the seed runs it: text tower + logit scale frozen, fresh vision tower"
MODEL_NAME="$OUT/pretrain/final_model" TRAIN_JSON="$DEMO/stage0_train.json" VAL_JSON="$DEMO/stage0_val.json" \
IMAGE_ROOT="$DEMO" OUTPUT_DIR="$OUT/stage0" LEARNING_RATE=2e-3 NUM_EPOCHS="$EPOCHS_STAGE0" \
    bash Stage0/run_train_vision_encoder_stage0.sh "${COMMON[@]}" --reinit_vision_tower

step "3c. Stage0 on the test split (small config-built models, synthetic images)"
python Stage0/evaluate_stage0.py \
    --model_path "$OUT/pretrain/final_model" "$OUT/pretrain/final_model" "$OUT/stage0/final_model" \
    --labels stand-in start after \
    --reinit_vision_tower start \
    --test_json "$DEMO/stage0_test.json" --image_root "$DEMO" \
    --findings_json "$DEMO/findings.json" --output_json "$OUT/stage0_test_metrics.json" \
    | tee "$OUT/stage0_table.md"
echo "(stand-in: both towers trained jointly; start: its text tower + a random vision tower;" \
     "after: Stage0's fine-tuned vision tower against the frozen text tower)"

step "4. Stage1: train the projector between Stage0's vision tower and the small Gemma3 (both frozen)"
IMAGE_ROOT="$DEMO" TRAIN_JSON="$DEMO/stage1_train.json" VAL_JSON="$DEMO/stage1_val.json" \
OUTPUT_DIR="$OUT/stage1" VISION_MODEL_NAME="$OUT/stage0/final_model" LLM_NAME="$OUT/tiny/gemma3" \
LEARNING_RATE=1e-3 NUM_EPOCHS="${EPOCHS_STAGE1:-3}" MAX_CAPTION_LEN=96 NUM_WORKERS=1 \
    bash scripts/run_stage1.sh --no-save_every_epoch --logging_steps 25
python - "$OUT/stage1/results.json" <<'PY' | tee "$OUT/stage1_table.md"
import json, sys
r = json.load(open(sys.argv[1]))
print("| Stage1 (val split)  | before | after |\n|---|---|---|")
print(f"| caption loss / token | {r['val_loss_before']:.4f} | {r['val_loss']:.4f} |")
PY

step "5. Stage2: VQA tuning of the small Gemma3 (and projector) on the demo questions"
IMAGE_ROOT="$DEMO" TRAIN_JSON="$DEMO/stage2_train.json" VAL_JSON="$DEMO/stage2_val.json" \
STAGE1_PROJECTOR_PATH="$OUT/stage1/final_model" OUTPUT_DIR="$OUT/stage2" \
VISION_MODEL_NAME="$OUT/stage0/final_model" LLM_NAME="$OUT/tiny/gemma3" \
BATCH_SIZE=32 GRAD_ACCUM=1 LEARNING_RATE="${LR_STAGE2:-2e-3}" NUM_EPOCHS="${EPOCHS_STAGE2:-3}" NUM_WORKERS=1 \
EXTRA_FLAGS="--unfreeze_projection_layer" \
    bash scripts/run_stage2.sh --warmup_steps 20 --logging_steps 50 --no-save_every_epoch

step "6. closed (yes/no) questions on the held-out test images, before and after Stage2"
for m in stage1 stage2; do
    python Stage2/evaluate.py --model_path "$OUT/$m/final_model" --image_root "$DEMO" \
        --test_json "$DEMO/stage2_test.json" --output_json "$OUT/${m}_vqa_test.json" \
        --max_new_tokens 48 --batch_size 64 > "$OUT/${m}_vqa_test.txt"
done
python - "$OUT" <<'PY' | tee "$OUT/stage2_table.md"
import json, sys
out = sys.argv[1]
b, a = (json.load(open(f"{out}/{m}_vqa_test.json"))["summary"] for m in ("stage1", "stage2"))
rows = [("closed yes/no accuracy", lambda s: s["closed"]["accuracy"]),
        ("  majority-answer baseline", lambda s: s["closed"]["majority_accuracy"]),
        ("location accuracy", lambda s: s["location"]["accuracy"]),
        ("open-answer token F1", lambda s: s["open"]["token_f1"])]
print("| test split (small models, synthetic images) | before Stage2 | after Stage2 |\n|---|---|---|")
for label, get in rows:
    print(f"| {label} | {get(b) or 0:.3f} | {get(a) or 0:.3f} |")
for f, acc in a["closed"]["by_finding"].items():
    print(f"|   closed, {f} | {b['closed']['by_finding'].get(f) or 0:.3f} | {acc:.3f} |")
PY

step "7. ask a held-out image questions through the inference CLI (the answer is stdout's last line)"
# the first held-out image with both cardiomegaly and a pleural effusion
IMG="$(python -c "import json; print(next(r['image'] for r in json.load(open('$DEMO/stage0_test.json')) if r['labels']['cardiomegaly'] and r['labels']['pleural_effusion']))")"
python -c "import json; r = next(r for r in json.load(open('$DEMO/stage0_test.json')) if r['image'] == '$IMG'); print('image:     $DEMO/' + r['image'] + '\nreference: ' + r['caption'])"
for Q in "Is there cardiomegaly?" "Which side is the pleural effusion on?" "Describe the findings."; do
    A="$(python Stage2/inference_vqa_stage2.py --model_path "$OUT/stage2/final_model" \
        --image_path "$DEMO/$IMG" --question "$Q" --max_new_tokens 64 2>/dev/null | tail -1)"
    printf 'Q: %s\nA: %s\n' "$Q" "$A"
done
echo
for run in stage0 stage1 stage2; do python scripts/plot_run.py "$OUT/$run" >/dev/null; done
echo "Tables: $OUT/stage0_table.md $OUT/stage1_table.md $OUT/stage2_table.md (small config-built models, synthetic images)"
echo "Pictures: $OUT/{stage0,stage1,stage2}/training_curves.png, $OUT/stage0_test_metrics_roc_*.png," \
     "$OUT/stage2_vqa_test.png (accuracy), $OUT/stage2_vqa_test_examples.png"
