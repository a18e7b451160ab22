"""Stage0 from MedSigLIP (google/medsiglip-448), on a tiny model of its shape (conftest.hub_medsiglip:
448 px, 14 px patches, 64 text tokens, fp32, the hub's processor), and --pad_to_square: recorded in
the export and applied, without being told, wherever the tower reads an image (Stage0 training,
inference and evaluation, the image cache, Stage1, Stage2)."""
import json
import shlex

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, SiglipImageProcessor, SiglipModel, SiglipTokenizer

import image_cache
from image_loader import PAD_TO_SQUARE_KEY, load_image, pad_to_square, pads_to_square
from Stage0.dataset import ImageTextContrastiveDataset
from Stage0.train_vision_encoder_stage0 import main
from test_stage0 import _args

SIZES = [(60, 36), (36, 61), (45, 44), (30, 30)]  # (width, height): landscape, portrait (odd pad), near-square, square
QUERIES = ["no acute finding", "cardiomegaly"]


def medsiglip_pad(arr: np.ndarray) -> np.ndarray:
    """google-health/medsiglip's `_zero_pad_image_to_square` (python/serving/predictor.py), the
    published reference the project's pad must match: H x W x C, zeros, d // 2 before."""
    height, width = arr.shape[:2]
    if height < width:
        d = width - height
        return np.pad(arr, ((d // 2, d - d // 2), (0, 0), (0, 0)))
    if width < height:
        d = height - width
        return np.pad(arr, ((0, 0), (d // 2, d - d // 2), (0, 0)))
    return arr


def _pixels(processor, image) -> torch.Tensor:
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def _reference(hub_medsiglip, path) -> torch.Tensor:
    """What MedSigLIP's own preprocessing feeds the tower: the decoded image zero-padded to a
    square, then the hub processor (its resize to 448 and normalisation)."""
    padded = Image.fromarray(medsiglip_pad(np.asarray(load_image(path))))
    return _pixels(SiglipImageProcessor.from_pretrained(hub_medsiglip), padded)


@pytest.fixture(scope="module")
def data(tmp_path_factory, demo_dir):
    """Non-square grey radiograph stand-ins (no pixel is 0: black is the padding's alone) with demo
    captions, in one JSON that Stage0, Stage1 and Stage2 all read."""
    root = tmp_path_factory.mktemp("medsiglip_data")
    captions = [r["caption"] for r in json.loads((demo_dir / "stage0_train.json").read_text())]
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        w, h = SIZES[i % len(SIZES)]
        Image.fromarray((rng.random((h, w)) * 200 + 40).astype(np.uint8)).save(root / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": captions[i], "problem": "Is the heart enlarged?",
                     "normal_caption": "no"})
    (root / "train.json").write_text(json.dumps(rows))
    return root


@pytest.fixture(scope="module")
def stage0(hub_medsiglip, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("medsiglip_stage0")
    trainer = main(_args(hub_medsiglip, out, data / "train.json", batch_size=4, max_steps=2, pad_to_square=True))
    return trainer, out / "final_model"


def test_pad_matches_medsiglip_for_every_shape_and_is_black(tmp_path):
    for w, h in SIZES + [(1, 4), (7, 2)]:
        arr = np.random.default_rng(w * h).integers(1, 256, (h, w, 3), dtype=np.uint8)
        out = pad_to_square(Image.fromarray(arr))
        np.testing.assert_array_equal(np.asarray(out), medsiglip_pad(arr))
    # MONOCHROME1 stores bright as low values; the loader inverts it, and the padding added after
    # that is black like every other image's, never the inverted white.
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    arr16 = np.full((20, 12), 100, np.uint16)
    arr16[5:15, 3:9] = 4000  # dense tissue: low after inversion
    ds.set_pixel_data(arr16, photometric_interpretation="MONOCHROME1", bits_stored=12)
    ds.save_as(tmp_path / "m1.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "m1.dcm").PhotometricInterpretation == "MONOCHROME1"
    decoded = np.asarray(load_image(tmp_path / "m1.dcm"))
    padded = np.asarray(pad_to_square(load_image(tmp_path / "m1.dcm")))
    assert padded.shape == (20, 20, 3)
    assert (padded[:, :4] == 0).all() and (padded[:, 16:] == 0).all()
    np.testing.assert_array_equal(padded[:, 4:16], decoded)
    assert decoded[0, 0, 0] == 255 and decoded[10, 5, 0] == 0  # inverted: background bright


def test_hub_shape_448_px_and_64_text_tokens(hub_medsiglip):
    config = json.loads((hub_medsiglip / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 448 and config["vision_config"]["patch_size"] == 14
    assert config["text_config"]["max_position_embeddings"] == 64 and config["dtype"] == "float32"
    assert isinstance(SiglipTokenizer.from_pretrained(hub_medsiglip), SiglipTokenizer)
    proc = AutoImageProcessor.from_pretrained(hub_medsiglip)
    assert (proc.size["height"], proc.size["width"], proc.resample) == (448, 448, 3)
    assert not pads_to_square(proc)  # the hub's processor records nothing: Stage0 --pad_to_square does


def test_stage0_trains_padded_and_the_export_records_it(stage0, hub_medsiglip, data):
    trainer, final = stage0
    ds = trainer.train_dataset
    assert ds.input_ids.shape[1] == 64  # MedSigLIP's text length, from its checkpoint
    before = SiglipModel.from_pretrained(hub_medsiglip)
    assert not torch.equal(before.vision_model.embeddings.patch_embedding.weight,
                           trainer.encoder.model.image.backbone.embeddings.patch_embedding.weight)
    for i, row in enumerate(ds.rows):  # what training fed the tower: MedSigLIP's own preprocessing
        assert torch.equal(ds[i]["pixel_values"], _reference(hub_medsiglip, row["image_path"])), row["image"]
    unpadded = _pixels(SiglipImageProcessor.from_pretrained(hub_medsiglip), load_image(ds.rows[0]["image_path"]))
    assert not torch.equal(ds[0]["pixel_values"], unpadded)

    assert json.loads((final / "preprocessor_config.json").read_text())[PAD_TO_SQUARE_KEY] is True
    # Plain transformers still loads the folder; the record comes back on the processor.
    assert isinstance(SiglipModel.from_pretrained(final), SiglipModel)
    assert pads_to_square(AutoImageProcessor.from_pretrained(final))


def test_inference_and_evaluation_pad_without_being_told(stage0, data):
    from Stage0.inference_stage0 import main as infer
    from Stage0.inference_stage0 import score
    from Stage0.towers import load_model
    trainer, final = stage0
    ds, model = trainer.train_dataset, trainer.encoder.model.eval()
    landscape = ds.rows[0]["image_path"]
    # The training model on the training dataset's own tensor: the embedding inference must give.
    expected = score(model, trainer.tokenizer, [ds[0]["pixel_values"][None]], QUERIES, "cpu")[0]
    got = dict(infer(["--model_path", str(final), "--image_path", str(landscape), "--queries", *QUERIES,
                      "--device", "cpu"]))
    assert [got[q] for q in QUERIES] == expected.tolist()
    plain = _pixels(trainer.image_processor, load_image(landscape))[None]
    assert score(model, trainer.tokenizer, [plain], QUERIES, "cpu")[0].tolist() != expected.tolist()

    # Evaluation and batch inference build their datasets from the export's processor alone.
    _, tokenizer, processor = load_model(final)
    again = ImageTextContrastiveDataset(data / "train.json", data, processor, tokenizer, 64)
    for i in range(len(ds)):
        assert torch.equal(again[i]["pixel_values"], ds[i]["pixel_values"])


def test_cache_keeps_padded_and_unpadded_apart(stage0, data, hub_medsiglip, tmp_path, monkeypatch):
    import shutil

    from scripts.data.preprocess_images import main as preprocess
    _, final = stage0
    monkeypatch.delenv(image_cache.ENV_VAR, raising=False)
    root = shutil.copytree(data, tmp_path / "data")
    tok = SiglipTokenizer.from_pretrained(hub_medsiglip)
    padded_proc = AutoImageProcessor.from_pretrained(final)
    plain_proc = AutoImageProcessor.from_pretrained(hub_medsiglip)

    def dataset(proc):
        return ImageTextContrastiveDataset(root / "train.json", root, proc, tok, 64)
    uncached = {name: [dataset(p)[i]["pixel_values"] for i in range(4)]
                for name, p in (("padded", padded_proc), ("plain", plain_proc))}

    common = ["--data", str(root / "train.json"), "--image_root", str(root), "--num_workers", "0"]
    assert preprocess(common + ["--model", str(final)]) == 0  # the export's record: a padded cache
    assert preprocess(common + ["--model", str(hub_medsiglip)]) == 0
    folders = sorted(p.name for p in (root / ".image_cache").iterdir())
    assert folders == ["448x448-bicubic", "448x448-bicubic-padsquare"]
    index = json.loads((root / ".image_cache" / "448x448-bicubic-padsquare" / "index.json").read_text())
    assert index["target"]["pad_to_square"] is True

    decodes = []
    real = image_cache.load_input
    monkeypatch.setattr(image_cache, "load_input", lambda path, **kw: decodes.append(path) or real(path, **kw))
    for name, proc in (("padded", padded_proc), ("plain", plain_proc)):
        ds = dataset(proc)
        assert ds.image_cache.folder.name == ("448x448-bicubic-padsquare" if name == "padded" else "448x448-bicubic")
        for i in range(4):
            assert torch.equal(ds[i]["pixel_values"], uncached[name][i]), (name, i)
    assert decodes == []  # every image came from its own cache
    assert not torch.equal(uncached["padded"][0], uncached["plain"][0])

    # The refresh command a stale cache logs rebuilds the padded cache, not the plain one.
    target = image_cache.target_from_processor(padded_proc)
    cmd = shlex.split(image_cache.refresh_command(root / "train.json", target, image_root=root))
    assert "--pad_to_square" in cmd
    shutil.rmtree(root / ".image_cache" / "448x448-bicubic-padsquare")
    assert preprocess(cmd[2:] + ["--num_workers", "0"]) == 0
    assert (root / ".image_cache" / "448x448-bicubic-padsquare" / "index.json").is_file()


def test_stage1_takes_the_medsiglip_tower_and_pads_into_stage2(stage0, data, hub_medsiglip, hub_gemma3_it, tmp_path,
                                                              monkeypatch):
    import Stage2.inference_vqa_stage2 as vqa
    from Stage1.train_projection_stage1 import main as stage1
    from Stage2.dataset import VQADataset
    from vlm import load_vlm
    _, final = stage0
    out = tmp_path / "stage1"
    trainer = stage1(["--image_root", str(data), "--train_json", str(data / "train.json"), "--output_dir", str(out),
                      "--vision_model_name", str(final), "--llm_name", str(hub_gemma3_it), "--batch_size", "2",
                      "--max_steps", "1", "--num_workers", "0", "--report_to", "none", "--max_caption_len", "8"])
    assert trainer.model.config.image_seq_length == (448 // 14) ** 2
    ds = trainer.train_loader.dataset
    landscape = ds.rows[0]["image_path"]
    reference = _reference(hub_medsiglip, landscape)
    assert torch.equal(ds[0]["pixel_values"], reference)

    exported = out / "final_model"
    assert json.loads((exported / "preprocessor_config.json").read_text())[PAD_TO_SQUARE_KEY] is True
    model, tokenizer, processor = load_vlm(exported)
    vqa_ds = VQADataset(data / "train.json", data, tokenizer, processor, model.config, with_answers=False)
    assert torch.equal(vqa_ds.pixel_values(0), reference)  # Stage2 training and evaluation

    seen = []
    real = vqa.generate_answers
    monkeypatch.setattr(vqa, "generate_answers",
                        lambda m, t, batch, **kw: seen.append(batch) or real(m, t, batch, **kw))
    vqa.main(["--model_path", str(exported), "--image_path", str(landscape), "--question", "Is the heart enlarged?",
              "--max_new_tokens", "2", "--device", "cpu"])
    assert torch.equal(seen[0]["pixel_values"][0], reference)  # the inference CLI


@pytest.mark.parametrize("flag", ["--pad_to_square", "--no-pad_to_square"])
def test_stage1_pads_the_hub_medsiglip_when_told(data, hub_medsiglip, hub_gemma3_it, tmp_path, flag):
    """The hub's MedSigLIP records nothing: Stage1's --pad_to_square pads and records it, and
    --no-pad_to_square leaves the images as they are."""
    from Stage1.train_projection_stage1 import main as stage1
    out = tmp_path / "stage1"
    trainer = stage1(["--image_root", str(data), "--train_json", str(data / "train.json"), "--output_dir", str(out),
                      "--vision_model_name", str(hub_medsiglip), "--llm_name", str(hub_gemma3_it), "--batch_size", "2",
                      "--max_steps", "1", "--num_workers", "0", "--report_to", "none", "--max_caption_len", "8", flag])
    ds = trainer.train_loader.dataset
    padded = torch.equal(ds[0]["pixel_values"], _reference(hub_medsiglip, ds.rows[0]["image_path"]))
    recorded = json.loads((out / "final_model" / "preprocessor_config.json").read_text()).get(PAD_TO_SQUARE_KEY, False)
    assert padded is recorded is (flag == "--pad_to_square")
    # Stage2 on the same hub tower follows what Stage 1 recorded, without being told
    from Stage2.train_vqa_stage2 import main as stage2
    trainer = stage2(["--image_root", str(data), "--train_json", str(data / "train.json"), "--output_dir",
                      str(tmp_path / "stage2"), "--vision_model_name", str(hub_medsiglip), "--llm_name",
                      str(hub_gemma3_it), "--stage1_projector_path", str(out / "final_model"), "--batch_size", "2",
                      "--max_steps", "1", "--num_workers", "0", "--report_to", "none", "--max_a_len", "8"])
    ds = trainer.train_loader.dataset
    assert torch.equal(ds.pixel_values(0), _reference(hub_medsiglip, ds.rows[0]["image_path"])) is padded


def test_the_record_stands_when_training_goes_on_and_flags_override_it(stage0):
    from types import SimpleNamespace

    from Stage0.towers import load_model
    from Stage0.train_vision_encoder_stage0 import apply_pad_to_square
    _, final = stage0
    for flag, pads in ((None, True), (False, False), (True, True)):
        model, _, processor = load_model(final)
        apply_pad_to_square(SimpleNamespace(pad_to_square=flag, model_name=str(final)), model, processor)
        assert pads_to_square(processor) is pads, flag


def test_pad_to_square_is_refused_for_ct_volumes(capsys):
    from Stage0.train_vision_encoder_stage0 import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--image_model_name", "merlin", "--text_model_path", "x", "--csv_file", "ct.csv",
                    "--output_dir", "o", "--pad_to_square"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--pad_to_square" in err and "CT volumes" in err and "drop --pad_to_square" in err
