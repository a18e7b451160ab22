"""Load any image the data sets point at (PNG, JPEG, DICOM) as an 8-bit RGB PIL image.

Every stage reads its images through ``load_image`` so that 16-bit PNGs, DICOM
radiographs and palette/alpha images all reach the vision tower in the same form,
and so that a bad row in a JSON/CSV file fails with a message that says which row
of which file to fix instead of a bare PIL traceback deep inside a DataLoader worker.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["PAD_TO_SQUARE_KEY", "ImageLoadError", "check_image", "load_image", "pad_to_square", "pads_to_square",
           "prepare_image", "record_pad_to_square", "resolve_image_path", "apply_pad_to_square"]

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


def fail(path, row, source, reason, hint, cause=None):
    """Raise ImageLoadError naming the file, the row and its source file, what is wrong and the fix."""
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
        fail(image, row, source, "the image path is empty",
              "Fill in the image column of that row or drop the row.")
    path = pathlib.Path(os.path.expanduser(str(image)))
    if not path.is_absolute() and image_root:
        path = pathlib.Path(os.path.expanduser(str(image_root))) / path
    if not path.is_file():
        reason = "it is a directory, not a file" if path.is_dir() else "no such file"
        fail(path, row, source, reason,
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


@contextlib.contextmanager
def _pil_errors(path, row, source):
    """PIL's exceptions as ImageLoadErrors naming the file, the row and the fix."""
    try:
        yield
    except ImageLoadError:
        raise
    except UnidentifiedImageError as exc:
        fail(path, row, source, "not a recognised image format (PNG, JPEG or DICOM expected)",
              "Re-export the image as PNG/JPEG/DICOM or fix the path in the data file.", exc)
    except Image.DecompressionBombError as exc:
        fail(path, row, source, f"image is too large for PIL's safety limit ({exc})",
              "Downscale the image before training.", exc)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        fail(path, row, source, f"the file is truncated or corrupt ({exc})",
              "Re-export or re-download the image, or remove the row.", exc)


def _load_pil(path, row, source) -> Image.Image:
    with _pil_errors(path, row, source), Image.open(path) as im:
        im.load()
        return _pil_to_rgb(im)


def _decoder_hint(ds) -> str:
    uid = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    return _DECODER_HINTS.get(uid, _GENERIC_DECODER_HINT)


def _load_dicom(path, row, source) -> Image.Image:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
    except ImportError as exc:
        fail(path, row, source, "reading DICOM needs pydicom>=3",
              "Install it with: pip install 'pydicom>=3'.", exc)

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
        fail(path, row, source, f"not a readable DICOM file ({exc})",
              "Re-export the image from the PACS or convert it to PNG.", exc)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        fail(path, row, source, "the DICOM file has no pixel data",
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
            fail(path, row, source, f"the pixel data is truncated or corrupt ({exc})",
                  "Re-export the image from the PACS or remove the row.", exc)
        fail(path, row, source, f"the compressed pixel data ({name}) could not be decoded ({exc})",
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
        fail(path, row, source, f"the DICOM LUT/windowing attributes are invalid ({exc})",
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
    path = _existing_file(path, row, source)
    if _is_dicom(path):
        return _load_dicom(path, row, source)
    return _load_pil(path, row, source)


# ---------------------------------------------------------------- padding to a square

# The record of --pad_to_square: a key of the tower's image processor, so it is saved in
# preprocessor_config.json by every save_pretrained of the processor (a Stage0 export, the VLM
# folders of Stage1 and Stage2, Stage2's vision_tower/) and read back by from_pretrained, which
# keeps unknown keys as attributes and ignores them when processing: plain transformers still
# loads the folder. The prefix keeps it clear of processors' own `pad_to_square` methods (LLaVA's).
PAD_TO_SQUARE_KEY = "siglip_med_pad_to_square"


def pad_to_square(image: Image.Image) -> Image.Image:
    """Zero-pad `image` to a square, centred (an odd pixel of padding goes after it, on the right or
    bottom). Zero is black in every mode load_image returns, MONOCHROME1 DICOM included (inverted
    there before this runs).

    MedSigLIP's own preprocessing, `_zero_pad_image_to_square` in google-health/medsiglip
    (python/serving/predictor.py: "method performed in training"), pads with zeros, d // 2 before
    and d - d // 2 after, before the SigLIP processor's resize. transformers' LLaVA processor pads
    with the image mean instead (its background_color is ignored), so the pad is this function's."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    left, top = (side - w) // 2, (side - h) // 2
    return ImageOps.expand(image, border=(left, top, side - w - left, side - h - top), fill=0)


def pads_to_square(processor) -> bool:
    """Whether the tower behind this image processor was trained on images padded to a square."""
    return bool(getattr(processor, PAD_TO_SQUARE_KEY, False))


def record_pad_to_square(processor, on: bool) -> None:
    """Record (or clear) --pad_to_square on the processor; its save_pretrained writes the record."""
    if on:
        setattr(processor, PAD_TO_SQUARE_KEY, True)
    elif hasattr(processor, PAD_TO_SQUARE_KEY):
        delattr(processor, PAD_TO_SQUARE_KEY)


def apply_pad_to_square(processor, flag: bool | None, tower: str) -> bool:
    """A trainer's --pad_to_square (True) / --no-pad_to_square (False) recorded on the tower's
    image processor, which every dataset reads and every export saves; neither (None): the
    record `tower`'s folder carries stands (a tower trained padded goes on padded). Returns
    whether images are padded, and says so in the log."""
    if flag is not None:
        record_pad_to_square(processor, flag)
    padded = pads_to_square(processor)
    if padded:
        import logging
        logging.getLogger("siglip_med").info(
            "images are zero-padded to a square before the %s resize (%s); the export records it",
            type(processor).__name__, "--pad_to_square" if flag else f"recorded by {tower}")
    return padded


def prepare_image(image, processor):
    """The decoded image as the tower behind `processor` was trained to see it, before the
    processor's own resize: padded to a square when the processor records --pad_to_square.
    Every dataset and CLI passes its images through here (CT volumes pass unchanged)."""
    if isinstance(image, Image.Image) and pads_to_square(processor):
        return pad_to_square(image)
    return image


def _existing_file(path, row, source) -> pathlib.Path:
    path = pathlib.Path(os.path.expanduser(str(path)))
    if not path.exists():
        fail(path, row, source, "no such file",
              "Check the image path and --image_root.")
    if not path.is_file():
        fail(path, row, source, "it is a directory, not a file",
              "Check the image path and --image_root.")
    return path


# ---------------------------------------------------------------- checks before training

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_END_MARKERS = {"PNG": (b"IEND\xaeB`\x82", "IEND chunk"), "JPEG": (b"\xff\xd9", "end-of-image marker")}
_UNDEFINED_LENGTH = 0xFFFFFFFF


def check_image(path, full: bool = False, *, row=None, source=None) -> None:
    """Raise ImageLoadError where `load_image(path)` would fail, reading as little as that takes.

    Default (`full=False`): the header and the end of the file, no pixels decoded: PIL's
    `Image.open` (format and size) and, for PNG and JPEG, the end marker (IEND, end-of-image)
    a truncated file lacks; DICOM: the elements up to and around the pixel data
    (`dcmread(defer_size=...)` locates the pixel data without reading it), that there is pixel
    data, that it fits in the file and in its Rows x Columns x frames, and that a decoder for its
    transfer syntax is installed. This reads a few KiB per file whatever its size (PIL's
    `verify()` would read every byte of a PNG, as much I/O as an epoch). `full=True` decodes the
    image as training does, which also finds damage inside the compressed data.
    """
    path = _existing_file(path, row, source)
    if full:
        load_image(path, row=row, source=source)
        return
    if _is_dicom(path):
        _check_dicom_header(path, row, source)
        return
    with _pil_errors(path, row, source), Image.open(path) as im:
        fmt, (w, h) = im.format, im.size
        if w < 1 or h < 1:
            fail(path, row, source, f"the image is {w}x{h} pixels", "Re-export the image or remove the row.")
    if fmt in _END_MARKERS:
        # A file cut short (an interrupted copy or download) lacks its end marker. JPEG's
        # entropy-coded data never holds FF D9 (an FF there is followed by 00 or a restart
        # marker), so the marker cannot be faked by pixel data. The 4 KiB window allows the
        # padding some writers append after the marker.
        marker, name = _END_MARKERS[fmt]
        size = path.stat().st_size
        with open(path, "rb") as fh:
            fh.seek(max(0, size - 4096))
            tail = fh.read()
        if marker not in tail:
            fail(path, row, source, f"the {fmt} file is truncated (it has no {name} at its end)",
                  "Re-export or re-download the image, or remove the row.")


def _check_dicom_header(path, row, source) -> None:
    try:
        import pydicom
        from pydicom.dataelem import RawDataElement
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:
        fail(path, row, source, "reading DICOM needs pydicom>=3",
              "Install it with: pip install 'pydicom>=3'.", exc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # defer_size: values over 1 KiB (the pixel data) are located in the file, not read.
            ds = pydicom.dcmread(path, defer_size=1024)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
            fail(path, row, source, f"not a readable DICOM file ({exc})",
                  "Re-export the image from the PACS or convert it to PNG.", exc)
    if any("End of file" in str(w.message) for w in caught):  # encapsulated data cut short
        fail(path, row, source, "the file is truncated (it ends inside the pixel data)",
              "Re-export the image from the PACS or remove the row.")
    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        fail(path, row, source, "the DICOM file has no pixel data",
              "It is probably a report or structured-report object; remove the row.")
    elem = ds.get_item(keyword, keep_deferred=True)
    if isinstance(elem, RawDataElement):
        length, tell = elem.length, elem.value_tell
    else:
        length, tell = len(elem.value or b""), None
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if k not in ds] + (
        ["(0002,0010) TransferSyntaxUID in the file meta"] if tsyntax is None else [])
    if missing:
        fail(path, row, source, f"the DICOM file lacks {', '.join(missing)}, which decoding its pixels needs",
              "Re-export the image from the PACS or remove the row.")
    if length == _UNDEFINED_LENGTH or tsyntax.is_compressed:
        try:
            from pydicom.pixels import get_decoder
            available = get_decoder(tsyntax).is_available
        except Exception:  # a transfer syntax pydicom has no decoder for at all
            available = False
        if not available:
            name = getattr(tsyntax, "name", None) or str(tsyntax or "unknown transfer syntax")
            fail(path, row, source, f"no decoder is installed for its compressed pixel data ({name})",
                  f"Install one with: pip install {_decoder_hint(ds)}.")
        return
    deflated = getattr(tsyntax, "is_deflated", False)  # offsets are into the inflated stream
    if tell is not None and not deflated and tell + length > path.stat().st_size:
        fail(path, row, source, f"the file is truncated ({path.stat().st_size} bytes, its pixel data ends at byte "
                                 f"{tell + length})", "Re-export the image from the PACS or remove the row.")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        need = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * frames
                * int(ds.BitsAllocated) + 7) // 8
    except (TypeError, ValueError) as exc:
        fail(path, row, source, f"the DICOM image attributes are invalid ({exc})",
              "Re-export the image from the PACS or remove the row.", exc)
    if str(ds.get("PhotometricInterpretation", "")).upper() != "YBR_FULL_422" and length < need:
        fail(path, row, source, f"the pixel data holds {length} bytes, fewer than its {ds.Rows}x{ds.Columns} "
                                 f"x {frames} frame(s) need ({need})",
              "Re-export the image from the PACS or remove the row.")
