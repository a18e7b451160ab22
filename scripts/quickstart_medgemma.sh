#!/usr/bin/env bash
# Stage2 from a MedGemma-shaped checkpoint on the embedded demo (run through
# `bash scripts/quickstart.sh --recipe medgemma`): a tiny Gemma3ForConditionalGeneration built
# from a config (a small SigLIP tower, MedGemma's pooled projector, a small Gemma 3 LM with the
# real Gemma 3 tokenizer; random weights, no download), evaluated zero-shot, fine-tuned with
# the launcher's BASE_VLM, evaluated again, then asked through the inference CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${QUICKSTART_DIR:-runs/quickstart_medgemma}"
DEMO="${DEMO_DIR:-data/demo}"
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*" >&2; }

step "1. demo data: synthetic phantoms (not patient data) -> $DEMO; the closed (yes/no) questions"
[ -f "$DEMO/stage2_test.json" ] || python scripts/demo/make_demo_data.py --out_dir "$DEMO"
python - "$DEMO" "$OUT" <<'PY'
import json, sys
demo, out = sys.argv[1:]
for split in ("train", "val", "test"):
    rows = [r for r in json.load(open(f"{demo}/stage2_{split}.json")) if r["question_type"] == "closed"]
    json.dump(rows, open(f"{out}/closed_{split}.json", "w"))
PY

step "2. a MedGemma-shaped model built from a config (random weights, the real Gemma 3 tokenizer): 32 px
    images, 4x4 patches pooled 2x2 to 4 image tokens (MedGemma: 896 px, 64x64 patches pooled to 256)"
python - "$OUT/tiny/medgemma" <<'PY'
import sys
from scripts.demo.make_tiny_models import build_tiny_medgemma
build_tiny_medgemma(sys.argv[1], image_size=32, patch_size=8, mm_tokens_per_image=4)
PY

step "3. zero-shot: the base checkpoint itself, evaluated on the held-out closed questions"
python Stage2/evaluate.py --model_path "$OUT/tiny/medgemma" --image_root "$DEMO" \
    --test_json "$OUT/closed_test.json" --output_json "$OUT/before_vqa_test.json" \
    --max_new_tokens 8 --batch_size 64 > "$OUT/before_vqa_test.txt"

step "4. Stage2 --base_vlm through the launcher. A random LM cannot learn through LoRA alone (its
    frozen output norm keeps every logit small), so this demo trains the LM fully (LORA_R=0);
    a pretrained MedGemma takes the launcher's default, LoRA r=16"
BASE_VLM="$OUT/tiny/medgemma" IMAGE_ROOT="$DEMO" TRAIN_JSON="$OUT/closed_train.json" VAL_JSON="$OUT/closed_val.json" \
OUTPUT_DIR="$OUT/stage2" LORA_R=0 GRADIENT_CHECKPOINTING=0 LEARNING_RATE="${LR_STAGE2:-2e-3}" \
NUM_EPOCHS="${EPOCHS_STAGE2:-4}" BATCH_SIZE=32 GRAD_ACCUM=1 NUM_GPUS=1 MIXED_PRECISION=no REPORT_TO=none \
NUM_WORKERS=1 MAX_A_LEN=16 \
    bash scripts/run_stage2.sh --warmup_steps 20 --logging_steps 50 --no-save_every_epoch

step "5. the fine-tuned model on the same questions, and the table"
python Stage2/evaluate.py --model_path "$OUT/stage2/final_model" --image_root "$DEMO" \
    --test_json "$OUT/closed_test.json" --output_json "$OUT/after_vqa_test.json" \
    --max_new_tokens 8 --batch_size 64 > "$OUT/after_vqa_test.txt"
python - "$OUT" <<'PY' | tee "$OUT/medgemma_table.md"
import json, sys
out = sys.argv[1]
b, a = (json.load(open(f"{out}/{m}_vqa_test.json"))["summary"] for m in ("before", "after"))
print("| closed questions, test split (tiny random MedGemma-shaped model, synthetic images) | zero-shot | "
      "after Stage2 --base_vlm |\n|---|---|---|")
print(f"| accuracy | {b['closed']['accuracy']:.3f} | {a['closed']['accuracy']:.3f} |")
print(f"| majority-answer baseline | {b['closed']['majority_accuracy']:.3f} | {a['closed']['majority_accuracy']:.3f} |")
print(f"| answers holding a yes/no verdict | {b['closed']['answered'] or 0:.3f} | {a['closed']['answered'] or 0:.3f} |")
for f, acc in a["closed"]["by_finding"].items():
    print(f"|   {f} | {b['closed']['by_finding'].get(f) or 0:.3f} | {acc:.3f} |")
PY

step "6. the inference CLI on a held-out image (the answer is stdout's last line)"
IMG="$(python -c "import json; print(json.load(open('$OUT/closed_test.json'))[0]['image'])")"
for Q in "Is there cardiomegaly?" "Is there a pleural effusion?"; do
    A="$(python Stage2/inference_vqa_stage2.py --model_path "$OUT/stage2/final_model" \
        --image_path "$DEMO/$IMG" --question "$Q" --max_new_tokens 8 2>/dev/null | tail -1)"
    printf 'Q: %s\nA: %s\n' "$Q" "$A"
done
echo "Table: $OUT/medgemma_table.md (a tiny random model built from a config, synthetic images: it says nothing" \
     "about MedGemma's own accuracy)"
