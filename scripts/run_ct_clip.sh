#!/usr/bin/env bash
# Chest CT CLIP recipe (seed 002): Merlin's 3D CT encoder + a decoder LLM used the LLM2Vec way
# as text encoder, trained with the SigLIP loss from a CSV of NPZ volumes (img_path, findings,
# split). Two phases, as the seed: PHASE=1 trains the heads on a frozen 3D backbone, PHASE=2
# continues from phase 1's output with everything training, the text LLM through LoRA adapters
# as LLM2Vec's own supervised stage (TEXT_LORA_R=0: a full fine-tune, which needs ZeRO-2 or
# more GPUs for an 8B tower). Step-based, as the seed: MAX_STEPS optimizer steps, repeating
# epochs as needed. Edit the block below, or override any VAR from the environment:
#   PHASE=1 CSV_FILE=data/ct/ct.csv ./scripts/run_ct_clip.sh
#   PHASE=2 ./scripts/run_ct_clip.sh
set -euo pipefail
cd "$(dirname "$0")/.."

: "${PHASE:=1}"
: "${MERLIN_CHECKPOINT:=checkpoints/merlin/i3_resnet_clinical_longformer_best_clip.pt}"  # the Merlin release
: "${TEXT_MODEL_PATH:=McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp}"  # decoder LLM or LLM2Vec MNTP adapter
: "${CSV_FILE:=data/ct/ct.csv}"                      # img_path,findings,split; NPZ {'image': (C, D, H, W)}
: "${IMAGE_ROOT:=}"                                  # empty: relative paths are next to the CSV
: "${VOLUME_SIZE:=160 224 224}"                      # D H W after resizing
: "${VOLUME_CLIP:=-1000 1000}"                       # HU window, scaled to [0, 1]
: "${PROJECTION_DIM:=512}"                           # the seed's shared embedding width
: "${BATCH_SIZE:=4}"                                 # per GPU
: "${GRAD_ACCUM:=1}"
: "${LEARNING_RATE:=$([ "$PHASE" = 1 ] && echo 1e-3 || echo 1e-5)}"
: "${WEIGHT_DECAY:=1e-4}"
: "${MAX_STEPS:=$([ "$PHASE" = 1 ] && echo 20000 || echo 50000)}"  # the whole run, epochs repeat as needed
: "${WARMUP_STEPS:=1000}"
: "${SAVE_INTERVAL:=5000}"                           # resume checkpoint every N steps (the seed's)
: "${LOG_INTERVAL:=100}"                             # the seed's
: "${TEXT_LORA_R:=16}"                               # phase 2: LoRA rank on the text LLM; 0: full fine-tune
: "${TEXT_LORA_ALPHA:=$((2 * TEXT_LORA_R))}"           # LLM2Vec's 2 x r
: "${TEXT_LORA_DROPOUT:=0.05}"
: "${MAX_TEXT_LENGTH:=512}"
: "${MIXED_PRECISION:=bf16}"
: "${OUTPUT_DIR:=runs/ct_clip_phase${PHASE}}"
: "${PHASE1_DIR:=runs/ct_clip_phase1}"
: "${WANDB_PROJECT:=ct-clip}"
: "${RUN_NAME:=merlin-llm2vec-phase${PHASE}}"
: "${REPORT_TO:=wandb}"
: "${NUM_WORKERS:=8}"
: "${NUM_GPUS:=1}"                    # per machine; several machines: NUM_MACHINES (scripts/launch_env.sh)

if [ "$PHASE" = 1 ]; then
    MODEL_FLAGS=(--image_model_name merlin --image_model_path "$MERLIN_CHECKPOINT"
                 --text_model_path "$TEXT_MODEL_PATH" --projection_dim "$PROJECTION_DIM" --freeze_image_backbone)
else  # phase 1's output: towers, heads, temperature and bias; everything trains
    MODEL_FLAGS=(--model_name "$PHASE1_DIR/final_model" --no_freeze_text_encoder
                 --text_lora_r "$TEXT_LORA_R" --text_lora_alpha "$TEXT_LORA_ALPHA" --text_lora_dropout "$TEXT_LORA_DROPOUT")
fi

source scripts/launch_env.sh  # the .venv, and preemption signals relayed to the trainers alone
# shellcheck disable=SC2086  # VOLUME_SIZE / VOLUME_CLIP are lists of numbers
launch --quiet \
    --mixed_precision "$MIXED_PRECISION" \
    Stage0/train_vision_encoder_stage0.py \
    "${MODEL_FLAGS[@]}" \
    --csv_file "$CSV_FILE" \
    --image_root "$IMAGE_ROOT" \
    --volume_size $VOLUME_SIZE \
    --volume_clip $VOLUME_CLIP \
    --batch_size "$BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --learning_rate "$LEARNING_RATE" \
    --weight_decay "$WEIGHT_DECAY" \
    --max_steps "$MAX_STEPS" \
    --warmup_steps "$WARMUP_STEPS" \
    --max_text_length "$MAX_TEXT_LENGTH" \
    --mixed_precision "$MIXED_PRECISION" \
    --num_workers "$NUM_WORKERS" \
    --output_dir "$OUTPUT_DIR" \
    --report_to "$REPORT_TO" \
    --project_name "$WANDB_PROJECT" \
    --experiment_name "$RUN_NAME" \
    --save_interval "$SAVE_INTERVAL" \
    --log_interval "$LOG_INTERVAL" \
    --resume_from_checkpoint latest \
    "$@"
