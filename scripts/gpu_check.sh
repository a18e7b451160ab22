#!/usr/bin/env bash
# Every stage on a CUDA GPU at real architecture sizes (random weights built from configs, so no
# download): Stage0 (bf16, fp16, trained text tower), Stage1, Stage2 (full and LoRA), the
# DeepSpeed ZeRO-2 and FSDP2 configs where one GPU can run them, --torch_compile with
# --gradient_checkpointing, the inference CLI, and scripts/benchmark.py --device cuda.
# Device and dtype bugs hide on CPU; this is the one command that finds them.
#
#   bash scripts/gpu_check.sh                         # everything, ~10 minutes on one H100
#   ONLY="stage0_bf16 stage1" bash scripts/gpu_check.sh
#   SIGLIP_PRESET=so400m-384 STEPS=20 bash scripts/gpu_check.sh
#
# Writes GPU_CHECK_DIR/summary.md (one row per check: result, seconds, samples/s, peak memory)
# and a log per check under GPU_CHECK_DIR/logs/. Exits non-zero if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${GPU_CHECK_DIR:-runs/gpu_check}"
SIGLIP_PRESET="${SIGLIP_PRESET:-l16-384}"
GEMMA3_PRESET="${GEMMA3_PRESET:-1b}"
GEMMA3_TOKENIZER="${GEMMA3_TOKENIZER:-}"     # a real Gemma 3 folder's tokenizer, if at hand
STEPS="${STEPS:-10}"
NUM_IMAGES="${NUM_IMAGES:-1200}"
ONLY="${ONLY:-}"
export PATH="$(dirname "$(command -v "${PYTHON:-python3}")"):$PATH"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled REPORT_TO=none PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NUM_WORKERS="${NUM_WORKERS:-6}" NUM_GPUS=1
DATA="$OUT/data" MODELS="$OUT/models"
mkdir -p "$OUT/logs"
SUMMARY="$OUT/summary.md"
FAILED=0

wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

stats() {  # last logged samples/s and peak memory of a run folder
    python3 - "$1/metrics.jsonl" <<'PY'
import json, sys
try:
    rows = [json.loads(l) for l in open(sys.argv[1]) if "train/samples_per_s" in l]
except OSError:
    rows = []
r = rows[-1] if rows else {}
sps, mem = r.get("train/samples_per_s"), r.get("train/peak_mem_gib")
print(f"{sps:.1f}" if sps else "-", f"{mem:.1f}" if mem else "-", sep=" | ")
PY
}

check() {  # check NAME COMMAND...: run, time, record
    local name="$1"; shift
    wanted "$name" || return 0
    local t0=$SECONDS rc
    printf '== %s\n' "$name" >&2
    "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
    local result="ok"
    if [ $rc -ne 0 ]; then result="FAIL ($rc)"; FAILED=1; tail -30 "$OUT/logs/$name.log" >&2; fi
    echo "| $name | $result | $((SECONDS - t0)) | $(stats "$OUT/$name") |" >> "$SUMMARY"
}

{
    echo "# GPU check: $(python3 -c 'import torch; print(torch.cuda.get_device_name())')"
    python3 -c 'import torch, transformers, accelerate, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, peft {peft.__version__}")'
    python3 -c 'import deepspeed; print("deepspeed", deepspeed.__version__)' 2>/dev/null || echo "deepspeed: not installed"
    echo "SigLIP $SIGLIP_PRESET + Gemma3 $GEMMA3_PRESET (random weights), bf16 unless named, $STEPS optimizer steps each"
    echo
    echo "| check | result | seconds | samples/s (last log) | peak GiB |"
    echo "|---|---|---|---|---|"
} > "$SUMMARY"

if [ ! -f "$DATA/stage2_test.json" ]; then
    check data python3 scripts/make_demo_data.py --out_dir "$DATA" --num_images "$NUM_IMAGES" \
        --image_size 512 --num_workers 8
fi
if [ ! -f "$MODELS/gemma3/config.json" ]; then
    check models python3 scripts/make_tiny_models.py --out_dir "$MODELS" --siglip_preset "$SIGLIP_PRESET" \
        --gemma3_preset "$GEMMA3_PRESET" ${GEMMA3_TOKENIZER:+--gemma3_tokenizer "$GEMMA3_TOKENIZER"} \
        --texts "$DATA/stage0_train.json" "$DATA/stage2_train.json"
fi

S0=(--max_steps "$STEPS" --num_workers "$NUM_WORKERS" --no-save_epoch_models --logging_steps 5)
stage0() {  # stage0 NAME [ENV=VALUE ...] -- [FLAGS...]
    local name="$1"; shift
    check "$name" env MODEL_NAME="$MODELS/siglip" TRAIN_JSON="$DATA/stage0_train.json" \
        VAL_JSON="$DATA/stage0_val.json" IMAGE_ROOT="$DATA" OUTPUT_DIR="$OUT/$name" NUM_EPOCHS=1 \
        BATCH_SIZE="${BS0:-64}" "$@" bash Stage0/run_train_vision_encoder_stage0.sh "${S0[@]}"
}
stage0 stage0_bf16 MIXED_PRECISION=bf16
stage0 stage0_fp16 MIXED_PRECISION=fp16
stage0 stage0_text MIXED_PRECISION=bf16 BATCH_SIZE=32 FREEZE_FLAGS="--no_freeze_text_encoder --no_freeze_logit_scale"
stage0 stage0_compile MIXED_PRECISION=bf16 FREEZE_FLAGS="--torch_compile --gradient_checkpointing"
stage0 stage0_deepspeed MIXED_PRECISION=bf16 BATCH_SIZE=32 GRAD_ACCUM=2 \
    ACCELERATE_CONFIG=scripts/accelerate/deepspeed_zero2.yaml
stage0 stage0_fsdp MIXED_PRECISION=bf16 BATCH_SIZE=32 GRAD_ACCUM=2 ACCELERATE_CONFIG=scripts/accelerate/fsdp.yaml

TOWER="$OUT/stage0_bf16/final_model"
[ -f "$TOWER/config.json" ] || TOWER="$MODELS/siglip"
S12=(--max_steps "$STEPS" --logging_steps 5 --no-save_every_epoch)
check stage1 env IMAGE_ROOT="$DATA" TRAIN_JSON="$DATA/stage1_train.json" VAL_JSON="$DATA/stage1_val.json" \
    OUTPUT_DIR="$OUT/stage1" VISION_MODEL_NAME="$TOWER" LLM_NAME="$MODELS/gemma3" BATCH_SIZE=16 \
    NUM_EPOCHS=1 MIXED_PRECISION=bf16 bash scripts/run_stage1.sh "${S12[@]}"

stage2() {  # stage2 NAME [ENV=VALUE ...]
    local name="$1"; shift
    check "$name" env IMAGE_ROOT="$DATA" TRAIN_JSON="$DATA/stage2_train.json" VAL_JSON="$DATA/stage2_val.json" \
        STAGE1_PROJECTOR_PATH="$OUT/stage1/final_model" OUTPUT_DIR="$OUT/$name" VISION_MODEL_NAME="$TOWER" \
        LLM_NAME="$MODELS/gemma3" BATCH_SIZE=8 GRAD_ACCUM=2 NUM_EPOCHS=1 MIXED_PRECISION=bf16 "$@" \
        bash scripts/run_stage2.sh "${S12[@]}"
}
stage2 stage2_full
stage2 stage2_lora LORA_R=16 LEARNING_RATE=2e-4
stage2 stage2_compile EXTRA_FLAGS="--torch_compile --gradient_checkpointing"
stage2 stage2_deepspeed ACCELERATE_CONFIG=scripts/accelerate/deepspeed_zero2.yaml
stage2 stage2_fsdp ACCELERATE_CONFIG=scripts/accelerate/fsdp.yaml

IMG="$DATA/$(python3 -c "import json; print(json.load(open('$DATA/stage2_test.json'))[0]['image'])" 2>/dev/null)"
for m in stage2_full stage2_lora; do
    check "infer_$m" python3 Stage2/inference_vqa_stage2.py --model_path "$OUT/$m/final_model" \
        --image_path "$IMG" --question "Is there cardiomegaly?" --max_new_tokens 32 --device cuda --json
done

check benchmark python3 scripts/benchmark.py --device cuda --output_json "$OUT/benchmark.json" \
    --output_md "$OUT/benchmark.md"

echo >> "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
