"""The pre-resized image cache: same pixels as decoding the source, read by every dataset without
a flag, ignored and rebuilt entry by entry when a source changes; the script and the benchmark."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import image_cache
from image_cache import ImageCache, Target, build_cache, load_cached, open_cache, target_from_processor
from image_loader import load_image

ROOT = Path(__file__).resolve().parents[1]
pydicom = pytest.importorskip("pydicom")


def _siglip(h=24, w=24):
    from transformers import SiglipImageProcessor
    return SiglipImageProcessor(size={"height": h, "width": w})


def _bit(edge=20):
    from transformers import BitImageProcessor
    return BitImageProcessor(size={"shortest_edge": edge}, crop_size={"height": edge, "width": edge})


def _dicom(arr16, path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.set_pixel_data(arr16, photometric_interpretation="MONOCHROME2", bits_stored=12)
    ds.save_as(path, enforce_file_format=True)


def _write(kind, path, seed=0):
    """Non-square images with texture (a resize that differs anywhere shows up)."""
    rng = np.random.default_rng(seed)
    if kind == "png8":
        Image.fromarray((rng.random((44, 60)) * 255).astype(np.uint8)).save(path)
    elif kind == "png16":
        Image.fromarray((rng.random((70, 52)) * 3000 + 800).astype(np.uint16)).save(path)
    elif kind == "rgb":
        Image.fromarray((rng.random((36, 50, 3)) * 255).astype(np.uint8)).save(path)
    elif kind == "dicom":
        _dicom((rng.random((48, 64)) * 4095).astype(np.uint16), path)
    return path


SUFFIX = {"png8": ".png", "png16": ".png", "rgb": ".png", "dicom": ".dcm"}


@pytest.fixture
def data(tmp_path):
    """A data folder: images/ and train.json naming three images (Stage0/1/2 keys in each row)."""
    (tmp_path / "images").mkdir()
    rows = []
    for i, kind in enumerate(("png8", "png16", "dicom")):
        name = f"{kind}{SUFFIX[kind]}"
        _write(kind, tmp_path / "images" / name, seed=i)
        rows.append({"image": name, "caption": f"finding {i}", "problem": "what is seen?",
                     "normal_caption": f"finding {i}"})
    (tmp_path / "train.json").write_text(json.dumps(rows))
    return tmp_path


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    from scripts.demo.make_tiny_models import GEMMA_SPECIAL, _train_bpe
    tok = _train_bpe(["finding 0", "finding 1", "finding 2", "what is seen?"], GEMMA_SPECIAL, 300)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def _preprocess(*argv):
    from scripts.data.preprocess_images import main
    return main([str(a) for a in argv])


# ---------------------------------------------------------------- pixel values

@pytest.mark.parametrize("kind", ["png8", "png16", "rgb", "dicom"])
def test_cached_pixels_equal_decode_then_resize(tmp_path, kind):
    src = _write(kind, tmp_path / f"src{SUFFIX[kind]}")
    for processor in (_siglip(24, 32), _bit(20)):
        target = target_from_processor(processor)
        folder = tmp_path / ".image_cache" / target.key
        build_cache([src], folder, target, progress=False)
        cached = ImageCache.load(folder, target).get(src)
        decoded = load_image(src)
        assert cached.mode == "RGB"
        # The processor gives exactly what it gives on the decoded source.
        from_cache = processor(images=cached, return_tensors="pt")["pixel_values"]
        from_source = processor(images=decoded, return_tensors="pt")["pixel_values"]
        assert torch.equal(from_cache, from_source), type(processor).__name__


def test_grey_sources_are_stored_as_one_uint8_channel(tmp_path):
    src = _write("png16", tmp_path / "a.png")
    target = Target(height=16, width=16)
    build_cache([src], tmp_path / "c", target, progress=False)
    cache = ImageCache.load(tmp_path / "c", target)
    arr = np.load(cache.file_for(cache.key(src)), mmap_mode="r")
    assert arr.shape == (16, 16) and arr.dtype == np.uint8


# ---------------------------------------------------------------- the datasets

def _make_dataset(which, data, processor, tokenizer):
    json_path, root = data / "train.json", data / "images"
    if which == "stage0":
        from Stage0.dataset import ImageTextContrastiveDataset
        ds = ImageTextContrastiveDataset(json_path, root, processor, tokenizer, max_length=8)
        return ds, lambda i: ds[i]["pixel_values"]
    if which == "stage1":
        from Stage1.dataset import ImageCaptionDataset
        ds = ImageCaptionDataset(json_path, root, tokenizer, processor, image_token_id=tokenizer.bos_token_id,
                                 num_image_tokens=4)
        return ds, lambda i: ds[i]["pixel_values"]
    if which == "stage2":
        from Stage2.dataset import VQADataset
        config = SimpleNamespace(image_token_index=tokenizer.bos_token_id, image_seq_length=4)
        ds = VQADataset(json_path, root, tokenizer, processor, config)
        return ds, lambda i: ds[i]["pixel_values"]
    from data_rows import read_rows
    from Stage0.inference_stage0 import ImageFiles
    ds = ImageFiles(read_rows(json_path, root, ("image",)), processor, str(json_path))
    return ds, lambda i: ds[i]


@pytest.fixture
def decodes(monkeypatch):
    """Counts the source decodes the datasets' shared loading function falls back to."""
    calls = []
    real = image_cache.load_input

    def counting(path, **kw):
        calls.append(Path(path).name)
        return real(path, **kw)
    monkeypatch.setattr(image_cache, "load_input", counting)
    return calls


@pytest.mark.parametrize("which", ["stage0", "stage1", "stage2", "inference"])
def test_datasets_read_the_cache_without_a_flag(which, data, tokenizer, decodes, monkeypatch):
    monkeypatch.delenv(image_cache.ENV_VAR, raising=False)
    processor = _siglip(24, 24)
    ds, pixels = _make_dataset(which, data, processor, tokenizer)
    plain = [pixels(i) for i in range(3)]
    assert len(decodes) == 3  # no cache yet: every image decoded from its source

    assert _preprocess("--data", data / "train.json", "--image_root", data / "images", "--size", 24, 24,
                       "--num_workers", 0) == 0
    decodes.clear()
    ds, pixels = _make_dataset(which, data, processor, tokenizer)
    cached = [pixels(i) for i in range(3)]
    assert decodes == []  # every image came from the cache
    for a, b in zip(plain, cached):
        assert torch.equal(a, b)

    monkeypatch.setenv(image_cache.ENV_VAR, "off")
    ds, pixels = _make_dataset(which, data, processor, tokenizer)
    pixels(0)
    assert len(decodes) == 1


def test_changed_source_is_decoded_and_rebuilt_alone(data, tokenizer, decodes, capsys, monkeypatch):
    monkeypatch.delenv(image_cache.ENV_VAR, raising=False)
    from Stage0.dataset import ImageTextContrastiveDataset
    processor, json_path, root = _siglip(24, 24), data / "train.json", data / "images"
    assert _preprocess("--data", json_path, "--image_root", root, "--size", 24, 24, "--num_workers", 0) == 0
    folder = data / ".image_cache" / "24x24-bicubic"
    cache = ImageCache.load(folder, Target(24, 24))
    files = {p.name: cache.file_for(cache.key(p)) for p in root.iterdir()}
    stamps = {n: os.stat(f).st_mtime_ns for n, f in files.items()}
    old = np.asarray(cache.get(root / "png16.png"))

    changed = root / "png16.png"
    _write("png16", changed, seed=99)  # new pixels, same size in bytes is possible: mtime tells
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    capsys.readouterr()
    ds = ImageTextContrastiveDataset(json_path, root, processor, tokenizer, max_length=8)
    log = capsys.readouterr().err  # the script's logging setup writes to stderr
    assert "2 of 3 images" in log and "1 stale" in log
    decodes.clear()
    items = [ds[i]["pixel_values"] for i in range(3)]
    assert decodes == ["png16.png"]  # only the changed source is decoded; the others still come from the cache
    assert torch.equal(items[1], processor(images=load_image(changed), return_tensors="pt")["pixel_values"][0])
    assert not torch.equal(items[1], processor(images=Image.fromarray(old).convert("RGB"),
                                               return_tensors="pt")["pixel_values"][0])

    capsys.readouterr()
    assert _preprocess("--data", json_path, "--image_root", root, "--size", 24, 24, "--num_workers", 0) == 0
    assert "built 1, already fresh 2" in capsys.readouterr().out
    for name, f in files.items():
        assert (os.stat(f).st_mtime_ns != stamps[name]) == (name == "png16.png"), name
    decodes.clear()
    ds = ImageTextContrastiveDataset(json_path, root, processor, tokenizer, max_length=8)
    assert torch.equal(ds[1]["pixel_values"], items[1]) and decodes == []


def test_volumes_and_unresizing_processors_pass_through(tmp_path):
    from Stage0.merlin import VolumeProcessor
    vol = tmp_path / "ct.npz"
    np.savez(vol, image=np.zeros((1, 4, 8, 8), np.float32))
    assert target_from_processor(VolumeProcessor(size=(4, 8, 8))) is None
    assert open_cache(tmp_path / "x.csv", VolumeProcessor(), [str(vol)]) is None
    p = _siglip()
    p.do_resize = False
    assert target_from_processor(p) is None
    cache = ImageCache(tmp_path / "c", Target(8, 8))
    assert load_cached(vol, cache=cache).shape == (1, 4, 8, 8)


# ---------------------------------------------------------------- the script

def test_script_end_to_end_with_a_model_folder_workers_and_a_bad_row(data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(image_cache.ENV_VAR, raising=False)
    model = tmp_path / "model"
    _bit(20).save_pretrained(model)
    (data / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 40)
    rows = json.loads((data / "train.json").read_text()) + [{"image": "broken.png", "caption": "x"}]
    (data / "all.json").write_text(json.dumps(rows))
    rc = _preprocess("--data", data / "all.json", "--image_root", data / "images", "--model", model,
                     "--num_workers", 1)
    assert rc == 1  # the broken image is named, the others are cached
    err = capsys.readouterr().err
    assert "broken.png" in err and "row 3" in err and str(data / "all.json") in err
    index = json.loads((data / ".image_cache" / "se20-bicubic" / "index.json").read_text())
    assert sorted(index["entries"]) == ["../../images/dicom.dcm", "../../images/png16.png", "../../images/png8.png"]
    assert index["target"] == {"height": None, "width": None, "shortest_edge": 20, "resample": 3}
    assert _preprocess("--data", data / "train.json", "--image_root", data / "images", "--model", model,
                       "--check") == 0

    # A CSV (Stage0 / knee layout: paths relative to the CSV), and the variable that moves the cache.
    (data / "knee.csv").write_text("img_path,impression\nimages/png8.png,normal\n")
    monkeypatch.setenv(image_cache.ENV_VAR, str(tmp_path / "elsewhere"))
    assert _preprocess("--data", data / "knee.csv", "--size", 8, 8, "--resample", "bilinear",
                       "--num_workers", 0) == 0
    assert (tmp_path / "elsewhere" / "8x8-bilinear" / "index.json").is_file()
    from transformers import SiglipImageProcessor
    proc = SiglipImageProcessor(size={"height": 8, "width": 8}, resample=2)
    assert open_cache(data / "knee.csv", proc, [str(data / "images" / "png8.png")]).is_fresh(
        data / "images" / "png8.png")


def test_script_help_and_errors_name_the_fix(tmp_path, capsys):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "data" / "preprocess_images.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "--model" in run.stdout and "--size" in run.stdout
    (tmp_path / "d.json").write_text(json.dumps([{"image": "missing.png"}]))
    with pytest.raises(SystemExit):
        _preprocess("--data", tmp_path / "d.json", "--size", 8, 8)
    err = capsys.readouterr().err
    assert "missing.png" in err and "row 0" in err and "--image_root" in err


def test_loader_kwargs_keep_workers_that_ignore_stop_signals():
    from training.data import ignore_stop_signals, loader_kwargs
    none = loader_kwargs(0)
    assert (none["num_workers"], none["persistent_workers"], none["worker_init_fn"]) == (0, False, None)
    workers = loader_kwargs(3)
    assert workers["persistent_workers"] is True
    assert workers["worker_init_fn"] is ignore_stop_signals  # a SIGTERM to the process group is the trainer's


# ---------------------------------------------------------------- the benchmark

def test_bench_data_quick():
    from scripts.bench.bench_data import bench_data
    rows = {r["row"]: r for r in bench_data(SimpleNamespace(device="cpu", repeats=1, quick=True))}
    assert {"data_png16", "data_dicom", "data_dicom_j2k", "data_jpeg", "data_loader_w0", "data_loader_w1",
            "data_loader_w2"} <= set(rows)
    # Only the JPEG 2000 row may be skipped (its codec is optional), and it then says why.
    assert not [r for name, r in rows.items() if "skipped" in r and name != "data_dicom_j2k"], rows
    assert rows["data_dicom_j2k"].get("skipped", "codec") != ""
    # Reading a 384 px entry beats decoding a 1024 px 16-bit PNG by far on any machine.
    assert rows["data_png16"]["speedup"] > 3
