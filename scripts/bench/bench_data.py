"""Data-loading benchmark: decoding each image from source vs reading the pre-resized cache.
An ablation (the project's own loader with and without its cache), not a peer comparison.

    python scripts/bench/bench_data.py            # 2048 px sources, 384 px target (a few minutes on 2 cores)
    python scripts/bench/bench_data.py --quick    # 1024 px sources, one repeat: a smoke run

Synthetic sources are written to a temporary folder. Rows (seconds are per image, one process):
  data_png16      16-bit greyscale PNG: load_image + resize vs the cached entry
  data_dicom      16-bit (12 bits stored) uncompressed DICOM
  data_dicom_j2k  the same DICOM as JPEG 2000 lossless, when Pillow can encode it and pydicom can
                  decode it (Pillow or pylibjpeg-openjpeg); otherwise the row says why it is skipped
  data_jpeg       8-bit greyscale JPEG
  data_loader_wN  a Stage0-style dataset (image + SigLIP processor) through a DataLoader with N
                  workers, 16-bit PNG sources: images/s decoding from source vs from the cache
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from image_cache import ImageCache, Target, build_cache, decode_resized, load_cached, to_image

TARGET = 384  # the seeds' SigLIP input size


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: imports, page cache
    times = []
    for _ in range(max(repeats, 1)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _radiograph(n: int, seed: int = 0) -> np.ndarray:
    """A smooth 12-bit image with noise: compresses like a radiograph, not like a flat test card."""
    y, x = np.mgrid[0:n, 0:n] / n
    rng = np.random.default_rng(seed)
    arr = 1800 + 1200 * np.sin(6 * x) * np.cos(4 * y) - 900 * (((x - 0.5) / 0.3) ** 2 + ((y - 0.5) / 0.4) ** 2 < 1)
    return (arr + rng.normal(0, 40, (n, n))).clip(0, 4095).astype(np.uint16)


def _dicom(arr16: np.ndarray, path: Path):
    from pydicom.dataset import Dataset as DicomDataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    ds = DicomDataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.Modality = "DX"
    ds.set_pixel_data(arr16, photometric_interpretation="MONOCHROME2", bits_stored=12)
    ds.save_as(path, enforce_file_format=True)
    return ds


def _j2k_dicom(ds, arr16: np.ndarray, path: Path) -> str | None:
    """Write `ds` as JPEG 2000 lossless; the reason it cannot be benchmarked, or None."""
    from PIL import features
    from pydicom.encaps import encapsulate
    from pydicom.pixels.decoders import JPEG2000LosslessDecoder
    from pydicom.uid import JPEG2000Lossless

    from image_loader import load_image
    if not features.check("jpg_2000"):
        return "this Pillow has no OpenJPEG to encode JPEG 2000"
    if not JPEG2000LosslessDecoder.is_available:
        return ("pydicom has no JPEG 2000 decoder (pip install pylibjpeg pylibjpeg-openjpeg): "
                + "; ".join(JPEG2000LosslessDecoder.missing_dependencies))
    buf = io.BytesIO()
    # Pillow's OpenJPEG writes the codestream; pydicom encapsulates it (its own J2K encoders need
    # pylibjpeg-openjpeg or gdcm).
    Image.fromarray(arr16).save(buf, format="JPEG2000", irreversible=False, no_jp2=True)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(path, enforce_file_format=True)
    try:
        load_image(path)
    except Exception as e:  # a decoder that is present but refuses this file
        return f"the JPEG 2000 DICOM did not decode ({e})"
    return None


class _Pixels(Dataset):
    """What a stage's dataset does per image: load (cached or not), then the image processor."""

    def __init__(self, paths, processor, cache):
        self.paths, self.processor, self.cache = paths, processor, cache

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = load_cached(self.paths[i], cache=self.cache)
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def _loader_rate(paths, processor, cache, num_workers: int, repeats: int, batch_size: int) -> float:
    """Seconds per image for one pass over `paths` (median of passes after a warm-up pass that
    also starts the persistent workers)."""
    from training.data import loader_kwargs
    dl = DataLoader(_Pixels(paths, processor, cache), batch_size=batch_size, **loader_kwargs(num_workers))

    def one_pass():
        for _ in dl:
            pass
    return _median_time(one_pass, repeats) / len(paths)


def bench_data(args) -> list[dict]:
    from transformers import SiglipImageProcessor

    quick = bool(getattr(args, "quick", False))
    repeats = 1 if quick else max(int(getattr(args, "repeats", 3)), 1)
    n = 1024 if quick else 2048
    target = Target(height=TARGET, width=TARGET)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    rows = []
    try:
        arr16 = _radiograph(n)
        files = {"png16": tmp / "cxr16.png", "dicom": tmp / "cxr.dcm", "dicom_j2k": tmp / "cxr_j2k.dcm",
                 "jpeg": tmp / "cxr.jpg"}
        Image.fromarray(arr16).save(files["png16"])
        if importlib.util.find_spec("pydicom") is None:  # an optional requirement on a bare GPU image
            skipped = {"dicom": "pydicom not installed", "dicom_j2k": "pydicom not installed"}
        else:
            ds = _dicom(arr16, files["dicom"])
            skipped = {"dicom_j2k": _j2k_dicom(ds, arr16, files["dicom_j2k"])}
        Image.fromarray((arr16 >> 4).astype(np.uint8)).save(files["jpeg"], quality=95)
        labels = {"png16": "16-bit PNG", "dicom": "16-bit DICOM, uncompressed", "dicom_j2k": "16-bit DICOM, JPEG 2000",
                  "jpeg": "8-bit JPEG"}
        cache_dir = tmp / ".image_cache" / target.key
        build_cache([p for k, p in files.items() if not skipped.get(k)], cache_dir, target, progress=False)
        cache = ImageCache.load(cache_dir, target)
        for kind, path in files.items():
            shape = f"{n}x{n} {labels[kind]} -> {TARGET}x{TARGET}"
            if skipped.get(kind):
                rows.append({"row": f"data_{kind}", "comparison": "ablation", "skipped": skipped[kind], "shape": shape})
                continue
            t_src = _median_time(lambda: to_image(decode_resized(path, target)), repeats)
            t_cache = _median_time(lambda: cache.get(path), repeats)
            rows.append({"row": f"data_{kind}", "comparison": "ablation", "baseline_s": t_src, "ours_s": t_cache,
                         "speedup": t_src / t_cache, "baseline_img_per_s": 1 / t_src, "ours_img_per_s": 1 / t_cache, "shape": shape})

        # The DataLoader rows: several files (copies: decoding cost is per file, not per content).
        count, batch = (4, 2) if quick else (16, 4)
        paths = [files["png16"]] + [shutil.copy(files["png16"], tmp / f"cxr16_{i}.png") for i in range(1, count)]
        build_cache(paths, cache_dir, target, progress=False)
        cache = ImageCache.load(cache_dir, target)
        processor = SiglipImageProcessor(size={"height": TARGET, "width": TARGET})
        workers = [0, 1, 2] if quick else [w for w in (0, 1, 2, 4, 8) if w <= (os.cpu_count() or 1)]
        for w in workers:
            t_src = _loader_rate(paths, processor, None, w, repeats, batch)
            t_cache = _loader_rate(paths, processor, cache, w, repeats, batch)
            rows.append({"row": f"data_loader_w{w}", "comparison": "ablation", "baseline_s": t_src, "ours_s": t_cache,
                         "speedup": t_src / t_cache, "baseline_img_per_s": 1 / t_src, "ours_img_per_s": 1 / t_cache,
                         "shape": f"{count} x {n}px 16-bit PNG -> SigLIP {TARGET}px, {w} workers, batch {batch}"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="kept for scripts/benchmark.py; decoding runs on the CPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    rows = bench_data(args)
    for r in rows:
        if "skipped" in r:
            print(f"{r['row']:<16} {r['shape']}: skipped ({r['skipped']})")
        else:
            print(f"{r['row']:<16} {r['shape']}: source {r['baseline_img_per_s']:8.1f} img/s, cache "
                  f"{r['ours_img_per_s']:8.1f} img/s ({r['speedup']:.1f}x)")
    return rows


if __name__ == "__main__":
    main()
