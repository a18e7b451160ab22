#!/usr/bin/env bash
# Stage 1: train the MLP projector between the frozen SigLIP tower and the frozen Gemma3 LM on
# image-caption pairs. Edit the block below, or override any VAR from the environment:
#   NUM_GPUS=8 BATCH_SIZE=32 ./scripts/run_stage1.sh --max_steps 100
# VISION_MODEL_NAME may be a Stage0 output (runs/stage0/final_model) instead of a hub id.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${IMAGE_ROOT:=data/cxr}"
: "${TRAIN_JSON:=data/cxr/stage1_train.json}"
: "${VAL_JSON=data/cxr/stage1_val.json}" # VAL_JSON= (empty): no validation
: "${OUTPUT_DIR:=runs/stage1}"
: "${VISION_MODEL_NAME:=StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli}"
: "${LLM_NAME:=google/gemma-3-1b-it}"
: "${PROJECTOR_DEPTH:=2}"             # 2 = LLaVA's projector; other depths do not load in plain transformers
: "${BATCH_SIZE:=16}"                 # per GPU
: "${GRAD_ACCUM:=1}"
: "${LEARNING_RATE:=1e-4}"
: "${WEIGHT_DECAY:=0.0}"
: "${NUM_EPOCHS:=1}"
: "${MAX_CAPTION_LEN:=256}"
: "${MIXED_PRECISION:=bf16}"          # also stores the frozen tower and LM in bf16
: "${NUM_WORKERS:=4}"
: "${WANDB_PROJECT:=stage1_projector_training}"
: "${RUN_NAME:=stage1-projector}"
: "${REPORT_TO:=wandb}"
: "${NUM_GPUS:=1}"                    # per machine; several machines: NUM_MACHINES (scripts/launch_env.sh)

source scripts/launch_env.sh  # the .venv, and preemption signals relayed to the trainers alone
launch --quiet \
    --mixed_precision "$MIXED_PRECISION" \
    Stage1/train_projection_stage1.py \
    --image_root "$IMAGE_ROOT" \
    --train_json "$TRAIN_JSON" \
    ${VAL_JSON:+--val_json "$VAL_JSON"} \
    --output_dir "$OUTPUT_DIR" \
    --vision_model_name "$VISION_MODEL_NAME" \
    --llm_name "$LLM_NAME" \
    --projector_depth "$PROJECTOR_DEPTH" \
    --batch_size "$BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --learning_rate "$LEARNING_RATE" \
    --weight_decay "$WEIGHT_DECAY" \
    --num_epochs "$NUM_EPOCHS" \
    --max_caption_len "$MAX_CAPTION_LEN" \
    --mixed_precision "$MIXED_PRECISION" \
    --num_workers "$NUM_WORKERS" \
    --report_to "$REPORT_TO" \
    --wandb_project "$WANDB_PROJECT" \
    --run_name "$RUN_NAME" \
    --resume_from_checkpoint latest \
    "$@"
