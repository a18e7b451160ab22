#!/usr/bin/env bash
# Stage 0: fine-tune the SigLIP vision encoder on CXR image-caption pairs (text tower and
# logit scale frozen). Edit the block below, or override any VAR from the environment:
#   NUM_GPUS=8 BATCH_SIZE=64 ./Stage0/run_train_vision_encoder_stage0.sh --max_steps 100
set -euo pipefail
cd "$(dirname "$0")/.."

: "${MODEL_NAME:=StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli}"
: "${TRAIN_JSON:=data/cxr/train.json}"
: "${VAL_JSON=data/cxr/val.json}"     # VAL_JSON= (empty): no validation
: "${IMAGE_ROOT:=data/cxr}"
: "${BATCH_SIZE:=64}"                 # per GPU; the SigLIP loss sees all GPUs' captions
: "${GRAD_ACCUM:=1}"                  # exact with a frozen text tower (negatives span the step)
: "${LEARNING_RATE:=1e-5}"
: "${WEIGHT_DECAY:=0.05}"
: "${NUM_EPOCHS:=3}"
: "${MIXED_PRECISION:=bf16}"
: "${FREEZE_FLAGS:=}"                 # e.g. "--no_freeze_text_encoder --no_freeze_logit_scale"
: "${OUTPUT_DIR:=runs/stage0}"
: "${WANDB_PROJECT:=stage0_vision_encoder}"
: "${RUN_NAME:=xraysiglip-stage0}"
: "${REPORT_TO:=wandb}"
: "${NUM_GPUS:=1}"                    # per machine; several machines: NUM_MACHINES (scripts/launch_env.sh)

source scripts/launch_env.sh  # the .venv, and preemption signals relayed to the trainers alone
# shellcheck disable=SC2086  # FREEZE_FLAGS is a list of flags
launch --quiet \
    --mixed_precision "$MIXED_PRECISION" \
    Stage0/train_vision_encoder_stage0.py \
    --model_name "$MODEL_NAME" \
    --train_json "$TRAIN_JSON" \
    ${VAL_JSON:+--val_json "$VAL_JSON"} \
    --image_root "$IMAGE_ROOT" \
    --batch_size "$BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --learning_rate "$LEARNING_RATE" \
    --weight_decay "$WEIGHT_DECAY" \
    --num_epochs "$NUM_EPOCHS" \
    --mixed_precision "$MIXED_PRECISION" \
    --output_dir "$OUTPUT_DIR" \
    --report_to "$REPORT_TO" \
    --wandb_project "$WANDB_PROJECT" \
    --run_name "$RUN_NAME" \
    --resume_from_checkpoint latest \
    $FREEZE_FLAGS \
    "$@"
