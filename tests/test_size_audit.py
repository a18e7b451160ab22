"""scripts/bench/size_audit.py: every launcher's default built from its real config on the meta
device (no weight loaded), memory per GPU per engine, resume and export sizes, what fits."""
import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from scripts.bench import size_audit
from scripts.bench.size_audit import (
    ROOT,
    SMALL_STATE_BYTES,
    Row,
    account,
    build_hf,
    launcher_defaults,
    layer_token_bytes,
    verdicts,
)

GEMMA3_1B, SO400M_VISION = 999_885_952, 428_225_600
LLAMA3_8B_CAUSAL, LLAMA3_8B_BASE = 8_030_261_248, 7_504_924_672


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One audit at the defaults through the entry point: (returned, stdout, JSON file)."""
    import logging
    path = tmp_path_factory.mktemp("audit") / "sizes.json"
    out = io.StringIO()
    before = logging.getLogger("siglip_med").level
    with contextlib.redirect_stdout(out):
        result = size_audit.main(["--json", str(path)])
    # Run in-process (as here) it must leave the project's log level alone: it once hid every
    # later INFO line of the test session.
    assert logging.getLogger("siglip_med").level == before
    return result, out.getvalue(), json.loads(path.read_text())


def rows_by_name(result):
    return {r["name"]: r for r in result["rows"]}


def test_main_prints_one_table_line_per_run_and_writes_the_same_rows_as_json(run):
    result, stdout, data = run
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    body = lines[header + 2: header + 2 + len(data["rows"])]
    assert [line.split(" | ")[0].lstrip("| ").rstrip(" *") for line in body] == [r["name"] for r in data["rows"]]
    assert all(line.count("|") == lines[header].count("|") for line in body)
    assert [r["name"] for r in result["rows"]] == [r["name"] for r in data["rows"]]
    assert {"Stage0 L/16-384", "Stage0 So400m/14-384", "Stage1 projector", "Stage2 LM full", "knee RAD-DINO @224",
            "CT phase 1", "CT phase 2, full", "CT phase 2, LoRA r=16", "derm LoRA r=16",
            *(f"Stage2 {what} (Gemma 3 {size})" for size in ("4B", "12B", "27B")
              for what in ("LM full", "LoRA r=16 on the LM")),
            *(f"Stage2 --base_vlm {what} (MedGemma {size})" for size in ("4B", "27B")
              for what in ("LM full", "LoRA r=16 all-linear"))} == set(rows_by_name(data))
    assert data["gpu_gb"] == 80 and data["num_gpus"] == 8


def test_known_parameter_counts_from_the_embedded_configs():
    def n(model):
        return sum(p.numel() for p in model.parameters())  # a tied weight is one parameter

    gemma = build_hf("google/gemma-3-1b-it", "causal_lm")
    assert gemma.lm_head.weight is gemma.model.embed_tokens.weight
    assert n(gemma) == GEMMA3_1B
    assert n(build_hf("google/siglip-so400m-patch14-384", "vision")) == SO400M_VISION
    assert n(build_hf("meta-llama/Meta-Llama-3-8B-Instruct", "causal_lm")) == LLAMA3_8B_CAUSAL
    base = build_hf("meta-llama/Meta-Llama-3-8B-Instruct")
    assert n(base) == LLAMA3_8B_BASE
    assert all(p.is_meta for p in base.parameters())  # nothing was allocated, let alone loaded
    # The launcher's LLM2Vec adapter id resolves to its base LLM's shapes.
    assert n(build_hf("McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp")) == LLAMA3_8B_BASE


def test_rows_count_what_the_launchers_build_and_train(run):
    from Stage0.merlin import MerlinBackbone
    rows = rows_by_name(run[0])
    with torch.device("meta"):
        merlin = sum(p.numel() for p in MerlinBackbone().parameters())
    heads = (2048 * 1024 + 1024 + 1024 * 512 + 512) + (4096 * 512 + 512) + 2  # CT heads + logit scale/bias
    # The CT text tower is the base LLM, without its 525M-parameter LM head.
    assert rows["CT phase 1"]["params_total"] == LLAMA3_8B_BASE + merlin + heads
    assert rows["CT phase 1"]["params_trained"] == heads
    lora_8b = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert rows["CT phase 2, LoRA r=16"]["params_total"] == rows["CT phase 1"]["params_total"] + lora_8b
    assert rows["Stage1 projector"]["params_trained"] == 1024 * 1152 + 1152 + 1152 * 1152 + 1152
    assert rows["Stage1 projector"]["params_total"] == GEMMA3_1B + 316_283_904 + 2_509_056
    assert rows["Stage2 LM full"]["params_trained"] == GEMMA3_1B  # the launcher leaves the projector frozen
    assert rows["derm LoRA r=16"]["params_trained"] == 24 * 16 * (4 * 2 * 768 + 2 * (768 + 3072)) + 2
    # Frozen towers that only feed features keep no activations; a frozen LM the projector's
    # gradient flows through keeps all of its own.
    assert sum(rows["CT phase 1"]["activations_detail"].values()) == 0
    assert rows["Stage1 projector"]["engines"]["one_gpu"]["activations"] > 10 * 2 ** 30


def test_resume_checkpoints_hold_trained_tensors_and_optimizer_state_never_a_frozen_tensor(run):
    # The byte formula is checked on hand-computed numbers below (a small model); here, what the
    # real launchers' rows hold: BatchNorm statistics only where Merlin trains, and the frozen
    # towers kept out (a Stage1 resume checkpoint is far smaller than its export).
    for r in run[0]["rows"]:
        d = r["resume_detail"]
        if "CT phase 2" in r["name"]:  # Merlin trains: its BatchNorm statistics resume with it
            assert 0 < d["trained_buffers"] < 2 ** 20
        else:
            assert d["trained_buffers"] == 0
    rows = rows_by_name(run[0])
    assert rows["Stage1 projector"]["resume_checkpoint_bytes"] < 64 * 2 ** 20 < rows["Stage1 projector"]["export_bytes"]
    assert rows["CT phase 1"]["resume_checkpoint_bytes"] < 100 * 2 ** 20


def tiny_row(mixed_precision="bf16"):
    """A frozen linear layer under a trained BatchNorm: 1,000 + 10 frozen, 4 trained."""
    model = nn.Sequential(nn.Linear(100, 10), nn.BatchNorm1d(2))
    model[0].requires_grad_(False)
    return Row("tiny", "x.sh", "g", model, [], 2, mixed_precision, {"act": 1000}, export_bytes=0)


def test_accounting_per_engine_and_the_resume_checkpoint_of_a_small_model():
    r = account(tiny_row(), num_gpus=4, gpu_bytes=1e12)
    one, ddp, z2 = (r["engines"][k] for k in ("one_gpu", "ddp", "zero2"))
    assert (r["params_trained"], r["params_frozen"]) == (4, 1010)
    assert one["weights"] == 4 * 4 + 2 * 1010 == z2["weights"] == ddp["weights"]  # ZeRO-2 keeps whole weights
    assert (one["gradients"], one["optimizer"], one["autocast_copies"]) == (16, 32, 8)
    assert (z2["gradients"], z2["optimizer"], z2["autocast_copies"]) == (4, 8, 0)
    assert ddp["gradients"] == 16 + 16  # the reducer's buckets
    assert one["total"] == 2036 + 16 + 32 + 8 + 1000
    # running_mean + running_var (fp32) + num_batches_tracked (int64) of the trained BatchNorm;
    # the frozen linear's 1,010 parameters are not in it.
    assert r["resume_checkpoint_bytes"] == 12 * 4 + (2 + 2) * 4 + 8 + SMALL_STATE_BYTES
    assert account(tiny_row("no"), 4, 1e12)["engines"]["one_gpu"]["weights"] == 4 * 1014


def test_a_run_that_does_not_fit_one_gpu_names_what_does():
    gpu = account(tiny_row(), 4, 1e12)["engines"]["zero2"]["total"]  # room for ZeRO-2 only
    rows = [account(tiny_row(), 4, gpu)]
    verdicts(rows, 4)
    assert not rows[0]["fits_one_gpu"] and rows[0]["fits_with"] == ["ZeRO-2 x4"]
    rows = [account(tiny_row(), 4, gpu - 1)]
    verdicts(rows, 4)
    assert rows[0]["fits_with"] == []


def test_every_launcher_default_fits_80gb_or_its_row_names_a_config_that_does(run):
    result, stdout, _ = run
    rows = rows_by_name(result)
    engines = {"one GPU": "one_gpu", "DDP x8": "ddp", "ZeRO-2 x8": "zero2", "FSDP2 x8": "fsdp2"}
    for r in result["rows"]:
        if r["launcher_default"] and not r["fits_one_gpu"]:
            assert r["fits_with"], r["name"]
        for named in r["fits_with"]:  # whatever a row names does fit
            if named in engines:
                assert r["engines"][engines[named]]["fits"]
            else:
                assert rows[named.removesuffix(" (one GPU)")]["fits_one_gpu"]
    full = rows["CT phase 2, full"]  # 7.6B parameters fully fine-tuned: ~16 B each
    one, ddp, zero2 = (full["engines"][k] for k in ("one_gpu", "ddp", "zero2"))
    assert not one["fits"] and not ddp["fits"]
    assert zero2["fits"] and zero2["total"] < one["total"] / 2
    assert full["fits_with"] == ["ZeRO-2 x8", "FSDP2 x8", "CT phase 2, LoRA r=16 (one GPU)"]
    assert rows["CT phase 2, LoRA r=16"]["fits_one_gpu"]
    # The launcher's TEXT_LORA_R picks phase 2's default; the other row is the marked alternative.
    lora_default = int(launcher_defaults(ROOT / "scripts/run_ct_clip.sh").get("TEXT_LORA_R", "0")) > 0
    assert rows["CT phase 2, LoRA r=16"]["launcher_default"] == lora_default != full["launcher_default"]
    line = next(line for line in stdout.splitlines() if line.startswith("| CT phase 2, full"))
    assert line.endswith("| no: ZeRO-2 x8; FSDP2 x8; CT phase 2, LoRA r=16 (one GPU) |")
    # Stage2's 27B full fine-tune fits with FSDP2 alone: ZeRO-2 keeps whole weights on every GPU
    assert rows["Stage2 LM full (Gemma 3 27B)"]["fits_with"] == ["FSDP2 x8"]
    assert {r["name"] for r in result["rows"] if not r["fits_one_gpu"]} == {
        "CT phase 2, full", "Stage2 LM full (Gemma 3 12B)", "Stage2 LM full (Gemma 3 27B)",
        "Stage2 LoRA r=16 on the LM (Gemma 3 27B)", "Stage2 --base_vlm LM full (MedGemma 4B)",
        "Stage2 --base_vlm LM full (MedGemma 27B)"}


def test_activation_formula_distinguishes_gelu_and_gated_mlps():
    llama = build_hf("meta-llama/Meta-Llama-3-8B-Instruct").config
    siglip = build_hf("google/siglip-base-patch16-224", "vision").config
    assert layer_token_bytes(llama) == 2 * (4 * 4096 + 2 * 4096 + 2 * 1024 + 4 * 14336)  # GQA, SwiGLU
    assert layer_token_bytes(siglip) == 2 * (4 * 768 + 2 * 768 + 2 * 768 + 2 * 3072)


def test_launcher_defaults_are_the_literal_values_and_an_unknown_model_is_named(tmp_path):
    sh = tmp_path / "run.sh"
    sh.write_text(': "${BATCH_SIZE:=12}"                 # per GPU\n'
                  ': "${RUN_NAME:=run-${BATCH_SIZE}}"\n'
                  ': "${CONFIG:=a/$([ "$N" -gt 1 ] && echo ddp || echo single).yaml}"\n'
                  ': "${EXTRA_FLAGS:=}"\n')
    assert launcher_defaults(sh) == {"BATCH_SIZE": "12", "EXTRA_FLAGS": ""}
    assert launcher_defaults(ROOT / "scripts/run_stage2.sh")["BATCH_SIZE"] == "8"
    with pytest.raises(KeyError, match="model_configs.py"):
        build_hf("someone/unknown-model")


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import scripts.bench.size_audit as a\n"
            "try:\n    a.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n" % str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--gpu_gb" in proc.stdout and "--json" in proc.stdout and "ESTIMATE" in proc.stdout


# ---------------------------------------------------------------- FSDP2 and the larger LMs

def test_shard_units_are_the_blocks_and_the_root_with_a_tied_head_counted_once():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from scripts.bench.size_audit import _meta, shard_units
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=4, tie_word_embeddings=True)
    with _meta():
        model = Gemma3ForCausalLM(cfg)
    model.lm_head.weight = model.model.embed_tokens.weight
    # a decoder layer: q 8x8, k and v 8x4, o 8x8, q/k norms 4 each, gate/up/down 8x16, four norms of 8
    layer = 64 + 32 + 32 + 64 + 4 + 4 + 3 * 128 + 4 * 8
    assert shard_units(model) == (layer, 64 * 8 + 8)  # root: the embedding (= the LM head) and the final norm


def test_fsdp2_shards_everything_and_gathers_the_root_and_two_blocks():
    r = account(tiny_row(), num_gpus=4, gpu_bytes=1e12)
    f = r["engines"]["fsdp2"]
    # no blocks in a Sequential: all 1,014 parameters are the root unit, gathered in bf16
    assert f["weights"] == (4 * 4 + 2 * 1010) / 4 + 2 * 1014
    assert (f["gradients"], f["optimizer"], f["autocast_copies"]) == (16 / 4, 32 / 4, 0)
    assert f["total"] == 509 + 2028 + 4 + 8 + 1000
    rows = [r]
    verdicts(rows, 4)
    assert r["engines"]["fsdp2"]["fits"] and r["fits_with"] == ["one GPU", "DDP x4", "ZeRO-2 x4", "FSDP2 x4"]


def test_the_larger_gemma_3_lms_have_their_published_sizes_and_need_sharding(run):
    rows = rows_by_name(run[0])
    # Gemma 3 technical report, Table 1: embedding + non-embedding parameters of each LM
    published = {"4B": 675e6 + 3209e6, "12B": 1012e6 + 10759e6, "27B": 1416e6 + 25600e6}
    for size, n in published.items():
        full, lora = rows[f"Stage2 LM full (Gemma 3 {size})"], rows[f"Stage2 LoRA r=16 on the LM (Gemma 3 {size})"]
        assert full["params_trained"] == pytest.approx(n, rel=5e-3), size
        assert not full["launcher_default"] and lora["params_trained"] < full["params_trained"] / 100
    full27 = rows["Stage2 LM full (Gemma 3 27B)"]
    assert full27["gpus_needed"] == {"zero2": None, "fsdp2": 8}  # unsharded weights alone exceed one GPU
    assert rows["Stage2 LM full (Gemma 3 12B)"]["gpus_needed"]["fsdp2"] <= \
        rows["Stage2 LM full (Gemma 3 12B)"]["gpus_needed"]["zero2"]
    assert "FSDP2 x8" in run[1] and "GPUs: ZeRO-2 / FSDP2" in run[1]


def test_medgemma_lora_fits_one_40gb_gpu_and_its_full_fine_tune_does_not():
    """The launcher's BASE_VLM defaults (LoRA r=16 on every linear layer of the LM, gradient
    checkpointing, its batch size) fit one 40 GB GPU for MedGemma 4B; the full fine-tune's
    weights, gradients and AdamW state alone are about 64 GB."""
    from scripts.bench.size_audit import base_vlm_defaults
    v = base_vlm_defaults(ROOT / "scripts/run_stage2.sh")
    assert (v["LORA_R"], v["LORA_TARGET_MODULES"], v["GRADIENT_CHECKPOINTING"]) == ("16", "all-linear", "1")
    assert v["BATCH_SIZE"] == launcher_defaults(ROOT / "scripts/run_stage2.sh")["BATCH_SIZE"]
    rows = rows_by_name(size_audit.audit(num_gpus=8, gpu_gb=40))
    lora, full = (rows[f"Stage2 --base_vlm {w} (MedGemma 4B)"] for w in ("LoRA r=16 all-linear", "LM full"))
    assert lora["fits_one_gpu"] and lora["batch_size"] == int(v["BATCH_SIZE"])
    # Gemma 3 4B: 4.30B parameters (the LM's 3.88B train in full; the 0.42B vision tower stays frozen)
    assert full["params_total"] == pytest.approx(4.30e9, rel=5e-3) == lora["params_total"] - lora["params_trained"]
    assert full["params_trained"] == pytest.approx(3.88e9, rel=5e-3)
    one = full["engines"]["one_gpu"]
    assert 60e9 < (one["gradients"] + one["optimizer"] + 4 * full["params_trained"]) < 66e9
    assert not full["fits_one_gpu"] and "Stage2 --base_vlm LoRA r=16 all-linear (MedGemma 4B) (one GPU)" in \
        full["fits_with"]
    assert lora["params_trained"] < full["params_trained"] / 100
    assert not rows["Stage2 --base_vlm LoRA r=16 all-linear (MedGemma 27B)"]["fits_one_gpu"]
