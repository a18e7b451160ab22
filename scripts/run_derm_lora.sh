#!/usr/bin/env bash
# Dermatology recipe (seed 004): LoRA on both towers of a pretrained SigLIP, trained with the
# label-aware losses on a multi-label, long-tailed data set (stratified split, rare classes
# oversampled in train). Edit the block below, or override any VAR from the environment:
#   CSV_FILE=data/derm/derm.csv CLASSES_FILE=data/derm/classes.csv ./scripts/run_derm_lora.sh
set -euo pipefail
cd "$(dirname "$0")/.."

: "${MODEL_NAME:=google/siglip-base-patch16-224}"
: "${CSV_FILE:=data/derm/derm.csv}"                  # img_path,labels (';'-separated)[,split]
: "${CLASSES_FILE:=data/derm/classes.csv}"           # condition,description,icd10
: "${IMAGE_ROOT:=}"                                  # empty: relative paths are next to the CSV
: "${LOSS:=multi_positive,icd,wasserstein,hard_negative}"
: "${POS_WEIGHT:=1.0}"                               # with "weighted" in LOSS
: "${ALPHA:=0.3}"                                    # ICD geometry weight (capped at 0.9)
: "${BETA:=0.1}"                                     # Wasserstein weight
: "${GAMMA:=0.1}"                                    # hard-negative weight
: "${RAMP_STEPS:=0,1000,2000,2500}"                  # a ramps, then b, then g
: "${STRATIFIED_SPLIT:=0.8,0.1,0.1}"
: "${OVERSAMPLE_MIN:=30}"
: "${LORA_R:=16}"
: "${LORA_ALPHA:=32}"
: "${LORA_DROPOUT:=0.05}"
: "${BATCH_SIZE:=64}"                                # per GPU
: "${LEARNING_RATE:=1e-4}"
: "${EPOCHS:=20}"
: "${MIXED_PRECISION:=bf16}"
: "${OUTPUT_DIR:=runs/derm_lora}"
: "${WANDB_PROJECT:=derm-siglip}"
: "${RUN_NAME:=siglip-lora-r${LORA_R}}"
: "${REPORT_TO:=wandb}"
: "${NUM_WORKERS:=4}"
: "${NUM_GPUS:=1}"                    # per machine; several machines: NUM_MACHINES (scripts/launch_env.sh)

source scripts/launch_env.sh  # the .venv, and preemption signals relayed to the trainers alone
launch --quiet \
    --mixed_precision "$MIXED_PRECISION" \
    Stage0/train_vision_encoder_stage0.py \
    --model_name "$MODEL_NAME" \
    --csv_file "$CSV_FILE" \
    --image_root "$IMAGE_ROOT" \
    --label_column labels \
    --classes_file "$CLASSES_FILE" \
    --loss "$LOSS" \
    --pos_weight "$POS_WEIGHT" \
    --alpha "$ALPHA" \
    --beta "$BETA" \
    --gamma "$GAMMA" \
    --ramp_steps "$RAMP_STEPS" \
    --stratified_split "$STRATIFIED_SPLIT" \
    --oversample_min "$OVERSAMPLE_MIN" \
    --lora_r "$LORA_R" \
    --lora_alpha "$LORA_ALPHA" \
    --lora_dropout "$LORA_DROPOUT" \
    --no_freeze_logit_scale \
    --batch_size "$BATCH_SIZE" \
    --learning_rate "$LEARNING_RATE" \
    --epochs "$EPOCHS" \
    --mixed_precision "$MIXED_PRECISION" \
    --num_workers "$NUM_WORKERS" \
    --output_dir "$OUTPUT_DIR" \
    --report_to "$REPORT_TO" \
    --project_name "$WANDB_PROJECT" \
    --experiment_name "$RUN_NAME" \
    --resume_from_checkpoint latest \
    "$@"
