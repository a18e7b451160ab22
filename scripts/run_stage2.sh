#!/usr/bin/env bash
# Stage 2: VQA instruction tuning of the SigLIP + projector + Gemma3 VLM on (image, question,
# answer) triplets, starting from the Stage 1 projector. Edit the block below, or override any
# VAR from the environment:
#   NUM_GPUS=8 BATCH_SIZE=16 ./scripts/run_stage2.sh --max_steps 100
#   EXTRA_FLAGS="--train_ve_first_epoch --unfreeze_projection_layer" ./scripts/run_stage2.sh
#   LORA_R=16 LEARNING_RATE=2e-4 ./scripts/run_stage2.sh      # LoRA on the LM instead of a full fine-tune
# LLM_NAME must be the LM Stage 1 was trained with. VISION_MODEL_NAME defaults to the tower
# Stage 1 recorded in its projection_layer/config.json; another tower is refused.
#
# Or fine-tune a Gemma 3 multimodal checkpoint as it ships (no Stage 1): BASE_VLM names it, and
# the defaults become LoRA r=16 on every linear layer of the LM, gradient checkpointing and
# LR 2e-4 (about 28 GB for MedGemma 4B at batch 8 by scripts/bench/size_audit.py):
#   BASE_VLM=google/medgemma-4b-it ./scripts/run_stage2.sh
#   BASE_VLM=google/medgemma-4b-it LORA_R=0 LEARNING_RATE=2e-5 ./scripts/run_stage2.sh   # full fine-tune
set -euo pipefail
cd "$(dirname "$0")/.."

: "${BASE_VLM:=}"                     # e.g. google/medgemma-4b-it; empty: the Stage 1 VLM
if [[ -n "$BASE_VLM" ]]; then
    : "${LORA_R:=16}"
    : "${LORA_TARGET_MODULES:=all-linear}"
    : "${GRADIENT_CHECKPOINTING:=1}"
    : "${LEARNING_RATE:=2e-4}"
fi

: "${IMAGE_ROOT:=data/cxr}"
: "${TRAIN_JSON:=data/cxr/stage2_train.json}"
: "${VAL_JSON=data/cxr/stage2_val.json}" # VAL_JSON= (empty): no validation
: "${STAGE1_PROJECTOR_PATH:=runs/stage1/final_model}"   # or runs/stage1/final_model/projection_layer
: "${OUTPUT_DIR:=runs/stage2}"
: "${VISION_MODEL_NAME:=}"                # empty: the tower Stage 1 recorded
: "${LLM_NAME:=google/gemma-3-1b-it}"
: "${BATCH_SIZE:=8}"                  # per GPU
: "${GRAD_ACCUM:=4}"
: "${LEARNING_RATE:=2e-5}"
: "${WEIGHT_DECAY:=0.0}"
: "${NUM_EPOCHS:=3}"
: "${MAX_Q_LEN:=128}"                 # question tokens; the image tokens are never cut
: "${MAX_A_LEN:=256}"                 # answer tokens, <end_of_turn> included
: "${LORA_R:=0}"                      # 0 = full fine-tune of the LM
: "${LORA_ALPHA:=16}"
: "${LORA_TARGET_MODULES:=}"          # empty: the trainer's default (attention and MLP projections)
: "${GRADIENT_CHECKPOINTING:=0}"      # 1: recompute activations in backward (less memory, ~30% slower)
: "${MIXED_PRECISION:=bf16}"          # also stores the parts that never train in bf16
: "${NUM_WORKERS:=4}"
: "${EXTRA_FLAGS:=}"                  # e.g. "--train_ve_first_epoch --unfreeze_projection_layer"
: "${WANDB_PROJECT:=stage2_vqa_training}"
: "${RUN_NAME:=stage2-vqa}"
: "${REPORT_TO:=wandb}"
: "${NUM_GPUS:=1}"                    # per machine; several machines: NUM_MACHINES (scripts/launch_env.sh)

if [[ -n "$BASE_VLM" ]]; then
    MODEL_FLAGS=(--base_vlm "$BASE_VLM")
else
    MODEL_FLAGS=(--stage1_projector_path "$STAGE1_PROJECTOR_PATH" --llm_name "$LLM_NAME"
                 ${VISION_MODEL_NAME:+--vision_model_name "$VISION_MODEL_NAME"})
fi
[[ "$GRADIENT_CHECKPOINTING" == 1 ]] && CHECKPOINTING=--gradient_checkpointing || CHECKPOINTING=--no-gradient_checkpointing

source scripts/launch_env.sh  # the .venv, and preemption signals relayed to the trainers alone
# shellcheck disable=SC2086  # EXTRA_FLAGS is a list of flags
launch --quiet \
    --mixed_precision "$MIXED_PRECISION" \
    Stage2/train_vqa_stage2.py \
    --image_root "$IMAGE_ROOT" \
    --train_json "$TRAIN_JSON" \
    ${VAL_JSON:+--val_json "$VAL_JSON"} \
    "${MODEL_FLAGS[@]}" \
    --output_dir "$OUTPUT_DIR" \
    --batch_size "$BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --learning_rate "$LEARNING_RATE" \
    --weight_decay "$WEIGHT_DECAY" \
    --num_epochs "$NUM_EPOCHS" \
    --max_q_len "$MAX_Q_LEN" \
    --max_a_len "$MAX_A_LEN" \
    --lora_r "$LORA_R" \
    --lora_alpha "$LORA_ALPHA" \
    ${LORA_TARGET_MODULES:+--lora_target_modules "$LORA_TARGET_MODULES"} \
    "$CHECKPOINTING" \
    --mixed_precision "$MIXED_PRECISION" \
    --num_workers "$NUM_WORKERS" \
    --report_to "$REPORT_TO" \
    --wandb_project "$WANDB_PROJECT" \
    --run_name "$RUN_NAME" \
    --resume_from_checkpoint latest \
    $EXTRA_FLAGS \
    "$@"
