#!/usr/bin/env bash
# Knee X-ray recipe (seed 003): RAD-DINO image tower + SigLIP text tower, trained with the
# SigLIP loss from a CSV (img_path, impression, split), new projection heads and a learnable
# temperature and bias. Edit the block below, or override any VAR from the environment:
#   NUM_GPUS=4 CSV_FILE=data/knee/knee.csv IMAGE_SIZE=448 ./scripts/run_knee_raddino.sh
set -euo pipefail
cd "$(dirname "$0")/.."

: "${IMAGE_MODEL_NAME:=microsoft/rad-dino}"          # any AutoModel image backbone
: "${TEXT_MODEL_NAME:=google/siglip-base-patch16-224}"  # a SigLIP (its text half) or a BERT-style encoder
: "${CSV_FILE:=data/knee/knee.csv}"                  # img_path,impression,split
: "${IMAGE_ROOT:=}"                                  # empty: relative paths are next to the CSV
: "${IMAGE_SIZE:=224}"                               # 224 or 448 (RAD-DINO's own default is 518)
: "${IMAGE_POOLING:=cls}"                            # cls or mean
: "${BATCH_SIZE:=64}"                                # per GPU; the loss sees every GPU's impressions
: "${GRAD_ACCUM:=1}"
: "${LEARNING_RATE:=1e-4}"
: "${WEIGHT_DECAY:=0.01}"
: "${EPOCHS:=20}"
: "${WARMUP_RATIO:=0.05}"
: "${LR_SCHEDULER:=one_cycle}"                       # the seed's OneCycleLR; or cosine, linear, constant
: "${TEMPERATURE:=0.1}"                              # initial t = 1/TEMPERATURE (SigLIP paper: 10); learnt
: "${MAX_TEXT_LENGTH:=64}"                           # clamped to the text tower's limit
: "${FREEZE_FLAGS:=}"                                # e.g. "--no_freeze_text_encoder" to train the text tower too
: "${MIXED_PRECISION:=bf16}"
: "${OUTPUT_DIR:=runs/knee_raddino}"
: "${WANDB_PROJECT:=knee-siglip}"
: "${RUN_NAME:=raddino-siglip-${IMAGE_SIZE}}"
: "${REPORT_TO:=wandb}"
: "${NUM_WORKERS:=4}"
: "${NUM_GPUS:=1}"                    # per machine; several machines: NUM_MACHINES (scripts/launch_env.sh)

source scripts/launch_env.sh  # the .venv, and preemption signals relayed to the trainers alone
# shellcheck disable=SC2086  # FREEZE_FLAGS is a list of flags
launch --quiet \
    --mixed_precision "$MIXED_PRECISION" \
    Stage0/train_vision_encoder_stage0.py \
    --image_model_name "$IMAGE_MODEL_NAME" \
    --text_model_name "$TEXT_MODEL_NAME" \
    --csv_file "$CSV_FILE" \
    --image_root "$IMAGE_ROOT" \
    --image_size "$IMAGE_SIZE" \
    --image_pooling "$IMAGE_POOLING" \
    --batch_size "$BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --learning_rate "$LEARNING_RATE" \
    --weight_decay "$WEIGHT_DECAY" \
    --epochs "$EPOCHS" \
    --warmup_ratio "$WARMUP_RATIO" \
    --lr_scheduler "$LR_SCHEDULER" \
    --temperature "$TEMPERATURE" \
    --max_text_length "$MAX_TEXT_LENGTH" \
    --mixed_precision "$MIXED_PRECISION" \
    --num_workers "$NUM_WORKERS" \
    --output_dir "$OUTPUT_DIR" \
    --report_to "$REPORT_TO" \
    --project_name "$WANDB_PROJECT" \
    --experiment_name "$RUN_NAME" \
    --resume_from_checkpoint latest \
    $FREEZE_FLAGS \
    "$@"
