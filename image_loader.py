"""Load any image the data sets point at (PNG, JPEG, DICOM) as an 8-bit RGB PIL image.

Every stage reads its images through ``load_image`` so that 16-bit PNGs, DICOM
radiographs and palette/alpha images all reach the vision tower in the same form,
and so that a bad row in a JSON/CSV file fails with a message that says which row
of which file to fix instead of a bare PIL traceback deep inside a DataLoader worker.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageLoadError", "load_image", "read_json_rows", "resolve_image_path"]

_DICOM_SUFFIXES = {".dcm", ".dicom"}

# Transfer syntax UID -> packages that provide a decoder. pydicom decodes
# uncompressed, deflated and RLE data by itself; everything else needs a plugin.
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg (or pyjpegls)",  # JPEG-LS
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg (or pyjpegls)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE
}
_GENERIC_DECODER_HINT = "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


class ImageLoadError(ValueError):
    """An image could not be found or decoded; the message names the file and the row."""

    def __init__(self, message, *, path=None, row=None, source=None):
        super().__init__(message)
        self.path = path
        self.row = row
        self.source = source


def _where(row, source):
    if isinstance(row, str) and source:  # a CSV's "line N"
        return f" ({row} of {source})"
    if row is not None and source:
        return f" (row {row} of {source})"
    if row is not None:
        return f" (row {row})"
    if source:
        return f" (listed in {source})"
    return ""


def _fail(path, row, source, reason, hint, cause=None):
    msg = f"Cannot load image '{path}'{_where(row, source)}: {reason}. {hint}"
    err = ImageLoadError(msg, path=str(path), row=row, source=source)
    if cause is not None:
        raise err from cause
    raise err


def resolve_image_path(image, image_root, *, row=None, source=None) -> pathlib.Path:
    """Join a data-set image path onto ``image_root`` and check that the file exists.

    Absolute paths are kept, so data sets that store absolute paths keep working
    whatever ``--image_root`` says.
    """
    if image is None or str(image).strip() == "":
        _fail(image, row, source, "the image path is empty",
              "Fill in the image column of that row or drop the row.")
    path = pathlib.Path(os.path.expanduser(str(image)))
    if not path.is_absolute() and image_root:
        path = pathlib.Path(os.path.expanduser(str(image_root))) / path
    if not path.is_file():
        reason = "it is a directory, not a file" if path.is_dir() else "no such file"
        _fail(path, row, source, reason,
              f"Check the image path and --image_root (now {image_root!r}); relative "
              "paths in the data file are joined onto --image_root.")
    return path


def _is_dicom(path: pathlib.Path) -> bool:
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    # Many archives export DICOM without an extension; the Part 10 preamble is
    # 128 bytes followed by the magic "DICM".
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _rescale_to_uint8(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if hi <= lo:
        # A blank frame has no contrast to stretch; 0 keeps it blank instead of NaN.
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (np.where(finite, arr, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _to_rgb_image(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] >= 3:
        arr = arr[:, :, :3]
    else:
        raise ValueError(f"unexpected pixel array shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))  # uint8 HxWx3 -> "RGB"


def _pil_to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # More than 8 bits per sample: stretch this image's own range, since
        # 12-bit data stored in 16-bit containers would otherwise look black.
        return _to_rgb_image(_rescale_to_uint8(np.asarray(im)))
    if mode in ("LA", "La"):
        return im.convert("L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        # Palette transparency has to go through RGBA or PIL warns; alpha is dropped.
        return im.convert("RGBA").convert("RGB")
    # L, 1, RGBA, RGBa, P, CMYK, YCbCr, LAB, HSV: PIL's own conversion is exact
    # for 8-bit data and simply drops alpha.
    return im.convert("RGB")


def _load_pil(path, row, source) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return _pil_to_rgb(im)
    except UnidentifiedImageError as exc:
        _fail(path, row, source, "not a recognised image format (PNG, JPEG or DICOM expected)",
              "Re-export the image as PNG/JPEG/DICOM or fix the path in the data file.", exc)
    except Image.DecompressionBombError as exc:
        _fail(path, row, source, f"image is too large for PIL's safety limit ({exc})",
              "Downscale the image before training.", exc)
    except (OSError, SyntaxError, ValueError) as exc:
        _fail(path, row, source, f"the file is truncated or corrupt ({exc})",
              "Re-export or re-download the image, or remove the row.", exc)


def _decoder_hint(ds) -> str:
    uid = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    return _DECODER_HINTS.get(uid, _GENERIC_DECODER_HINT)


def _load_dicom(path, row, source) -> Image.Image:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
    except ImportError as exc:
        _fail(path, row, source, "reading DICOM needs pydicom>=3",
              "Install it with: pip install 'pydicom>=3'.", exc)

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
        _fail(path, row, source, f"not a readable DICOM file ({exc})",
              "Re-export the image from the PACS or convert it to PNG.", exc)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        _fail(path, row, source, "the DICOM file has no pixel data",
              "It is probably a report or structured-report object; remove the row.")

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        # Decoding only frame 0 keeps large multi-frame studies cheap.
        arr = pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
    except Exception as exc:  # plugins raise RuntimeError, ValueError, NotImplementedError...
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(tsyntax, "name", None) or str(tsyntax or "unknown transfer syntax")
        if tsyntax is not None and not getattr(tsyntax, "is_compressed", True):
            # Uncompressed data never needs a plugin, so a failure means bad bytes.
            _fail(path, row, source, f"the pixel data is truncated or corrupt ({exc})",
                  "Re-export the image from the PACS or remove the row.", exc)
        _fail(path, row, source, f"the compressed pixel data ({name}) could not be decoded ({exc})",
              f"Install a decoder with: pip install {_decoder_hint(ds)} "
              "(if one is installed already, the file may be corrupt: re-export it).", exc)
    if frames > 1:
        warnings.warn("image_loader: multi-frame DICOM found; only the first frame of each "
                      "is used", stacklevel=3)

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        elif photometric.startswith("MONOCHROME"):
            arr = apply_modality_lut(arr, ds)
            if "VOILUTSequence" in ds or "WindowCenter" in ds:
                arr = apply_voi_lut(arr, ds, index=0)
        # RGB / YBR_* were already converted to RGB by pydicom's decoder.
    except Exception as exc:
        _fail(path, row, source, f"the DICOM LUT/windowing attributes are invalid ({exc})",
              "Fix or remove the RescaleSlope/WindowCenter/VOI LUT tags, or re-export the image.",
              exc)

    if arr.dtype == np.uint8 and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # 8-bit colour is already display-ready; stretching it would shift its colours.
        return _to_rgb_image(arr)
    out = _rescale_to_uint8(arr)
    if photometric == "MONOCHROME1":
        # MONOCHROME1 stores bright = low values; flip it so dense tissue (bone,
        # mediastinum) is bright as on every other radiograph the model sees.
        out = 255 - out
    return _to_rgb_image(out)


def load_image(path, *, row=None, source=None) -> Image.Image:
    """Return the image at ``path`` as an RGB, uint8 PIL image.

    ``row`` and ``source`` only make error messages point at the data-file line
    that named the image. Every failure raises ``ImageLoadError``.
    """
    path = pathlib.Path(os.path.expanduser(str(path)))
    if not path.exists():
        _fail(path, row, source, "no such file",
              "Check the image path and --image_root.")
    if not path.is_file():
        _fail(path, row, source, "it is a directory, not a file",
              "Check the image path and --image_root.")
    if _is_dicom(path):
        return _load_dicom(path, row, source)
    return _load_pil(path, row, source)


def read_json_rows(json_path, image_root, keys, *, image_key="image") -> list[dict]:
    """Load a data file (a JSON list of objects) and check every row up front, so a bad row
    fails before training starts with the file, the row index and what is wrong. Each row
    comes back with `image_path` (resolved, existing) and `row` (its index) added."""
    json_path = pathlib.Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: no such data file")
    try:
        rows = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from e
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{json_path}: expected a non-empty JSON list of objects with keys {list(keys)}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{json_path} row {i}: expected an object, got {type(row).__name__}")
        missing = [k for k in keys if not isinstance(row.get(k), (str, int, float)) or not str(row[k]).strip()]
        if missing:
            raise ValueError(f"{json_path} row {i}: missing or empty {missing} (has {sorted(row)})")
        path = resolve_image_path(row[image_key], image_root, row=i, source=str(json_path))
        out.append({**row, "image_path": str(path), "row": i})
    return out


def csv_columns(path) -> list[str]:
    """A CSV's header (empty for a file that cannot be read: reading the rows reports why)."""
    import csv
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return csv.DictReader(f).fieldnames or []
    except OSError:
        return []


def read_csv_rows(csv_path, image_root, keys, *, image_key, split_column=None, split=None) -> list[dict]:
    """read_json_rows for a CSV with a header: every row checked up front, errors name the
    file's line (the header is line 1). `split_column`/`split` keep the rows of one split."""
    import csv
    csv_path = pathlib.Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: no such data file")
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        wanted = list(keys) + ([split_column] if split_column else [])
        missing = [k for k in wanted if k not in columns]
        if missing:
            raise ValueError(f"{csv_path}: no column {missing} (columns: {columns}); name the columns with "
                             "--img_path_column / --findings_column / --split_column")
        out = []
        for i, row in enumerate(reader):
            line = i + 2
            if split_column and str(row[split_column]).strip() != split:
                continue
            empty = [k for k in keys if not str(row.get(k) or "").strip()]
            if empty:
                raise ValueError(f"{csv_path} line {line}: empty {empty}")
            # Relative paths: under --image_root, else next to the CSV.
            path = resolve_image_path(row[image_key].strip(), image_root or csv_path.parent, row=f"line {line}",
                                      source=str(csv_path))
            out.append({**row, "image_path": str(path), "row": f"line {line}", "line": line})
    if not out:
        raise ValueError(f"{csv_path}: no rows" + (f" with {split_column} == {split!r}" if split_column else ""))
    return out


def read_rows(path, image_root, keys, *, image_key="image", split_column=None, split=None) -> list[dict]:
    """Rows of a JSON list or a CSV file (by suffix), each checked, with `image_path` resolved."""
    if str(path).lower().endswith(".csv"):
        return read_csv_rows(path, image_root, keys, image_key=image_key, split_column=split_column, split=split)
    rows = read_json_rows(path, image_root, keys, image_key=image_key)
    if split_column:
        rows = [r for r in rows if str(r.get(split_column, "")).strip() == split]
        if not rows:
            raise ValueError(f"{path}: no rows with {split_column} == {split!r}")
    return rows


# ---------------------------------------------------------------- CT volumes (NPZ)

def load_volume(path, *, row=None, source=None, key: str = "image") -> np.ndarray:
    """A CT volume from an NPZ holding {'image': (C, D, H, W)}, as float32; errors name the
    file, the row and what is wrong (missing file, no 'image' array, wrong rank, NaN/inf)."""
    path = pathlib.Path(path)
    if not path.is_file():
        _fail(path, row, source, "no such file", "check the path and --image_root")
    try:
        with np.load(path) as z:
            if key not in z.files:
                _fail(path, row, source, f"no {key!r} array (has {z.files})", "save the volume as np.savez(path, image=vol)")
            vol = z[key]
    except ImageLoadError:
        raise
    except Exception as e:  # a truncated or non-NPZ file
        _fail(path, row, source, f"not a readable NPZ ({e})", "re-export the volume", cause=e)
    if vol.ndim == 3:
        vol = vol[None]
    if vol.ndim != 4:
        _fail(path, row, source, f"'image' has shape {vol.shape}, expected (C, D, H, W)", "save one (C, D, H, W) volume per file")
    vol = vol.astype(np.float32, copy=False)
    if not np.isfinite(vol).all():
        _fail(path, row, source, "the volume holds NaN or inf", "fix or drop this volume")
    return vol


class VolumeProcessor:
    """A CT volume (C, D, H, W) -> pixel_values (1, D', H', W') for a 3D tower, in the image
    processors' call style. Intensities are clipped to [clip_min, clip_max] and scaled to [0, 1]
    (defaults: Hounsfield units -1000..1000, Merlin's range; already-scaled volumes pass
    0..1), channels are averaged (Merlin reads one channel: a 2-channel NPZ, e.g. two windows
    of one scan, becomes their mean), and the volume is resized trilinearly to `size` (D, H, W)."""

    def __init__(self, size=(160, 224, 224), clip_min: float = -1000.0, clip_max: float = 1000.0):
        self.size, self.clip_min, self.clip_max = tuple(int(v) for v in size), float(clip_min), float(clip_max)

    def to_dict(self) -> dict:
        return {"size": list(self.size), "clip_min": self.clip_min, "clip_max": self.clip_max}

    def save_pretrained(self, out_dir) -> None:
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "volume_processor.json").write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, path):
        return cls(**json.loads((pathlib.Path(path) / "volume_processor.json").read_text()))

    def __call__(self, images, return_tensors="pt"):
        import torch
        import torch.nn.functional as F
        vols = images if isinstance(images, (list, tuple)) else [images]
        out = []
        for v in vols:
            v = np.clip(np.asarray(v, dtype=np.float32), self.clip_min, self.clip_max)
            v = (v - self.clip_min) / (self.clip_max - self.clip_min)
            t = torch.from_numpy(v).mean(0, keepdim=True)[None]  # (1, 1, D, H, W)
            out.append(F.interpolate(t, size=self.size, mode="trilinear", align_corners=False)[0])
        return {"pixel_values": torch.stack(out)}


def load_input(path, *, row=None, source=None):
    """An image (PNG/JPEG/DICOM) or, for .npz, a CT volume: whatever the tower's processor takes."""
    if str(path).lower().endswith(".npz"):
        return load_volume(path, row=row, source=source)
    return load_image(path, row=row, source=source)
