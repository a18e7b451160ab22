"""CT volumes (NPZ holding {'image': (C, D, H, W)}), loaded and checked with the same errors as
images: the file, the row and the fix. `load_input`/`check_input` take either kind of input,
by suffix: a volume for .npz, else an image (`image_loader`)."""
from __future__ import annotations

import pathlib

import numpy as np

from image_loader import ImageLoadError, check_image, fail, load_image


def load_volume(path, *, row=None, source=None, key: str = "image") -> np.ndarray:
    """A CT volume from an NPZ holding {'image': (C, D, H, W)}, as float32; errors name the
    file, the row and what is wrong (missing file, no 'image' array, wrong rank, NaN/inf)."""
    path = pathlib.Path(path)
    if not path.is_file():
        fail(path, row, source, "no such file", "check the path and --image_root")
    try:
        with np.load(path) as z:
            if key not in z.files:
                fail(path, row, source, f"no {key!r} array (has {z.files})", "save the volume as np.savez(path, image=vol)")
            vol = z[key]
    except ImageLoadError:
        raise
    except Exception as e:  # a truncated or non-NPZ file
        fail(path, row, source, f"not a readable NPZ ({e})", "re-export the volume", cause=e)
    if vol.ndim == 3:
        vol = vol[None]
    if vol.ndim != 4:
        fail(path, row, source, f"'image' has shape {vol.shape}, expected (C, D, H, W)", "save one (C, D, H, W) volume per file")
    vol = vol.astype(np.float32, copy=False)
    if not np.isfinite(vol).all():
        fail(path, row, source, "the volume holds NaN or inf",
              "fix or drop this volume; scripts/data/validate_data.py --full_decode (or training with --full_decode_check) "
              "finds every such volume before training")
    return vol


def check_volume(path, full: bool = False, *, row=None, source=None, key: str = "image") -> None:
    """Raise ImageLoadError where `load_volume(path)` would fail. Default: from the NPZ's zip
    directory and the array's .npy header only (the key, a 3-D or 4-D shape, a numeric dtype,
    and that the stored bytes hold that shape); `full=True` reads the volume, which also finds
    NaN/inf values."""
    import zipfile
    path = pathlib.Path(path)
    if full:
        load_volume(path, row=row, source=source, key=key)
        return
    if not path.is_file():
        fail(path, row, source, "no such file", "check the path and --image_root")
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            if key not in names:
                fail(path, row, source, f"no {key!r} array (has {names})",
                      "save the volume as np.savez(path, image=vol)")
            info = zf.getinfo(f"{key}.npy")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                header_bytes = f.tell()
    except ImageLoadError:
        raise
    except Exception as e:  # not a zip, a truncated zip, a damaged .npy header
        fail(path, row, source, f"not a readable NPZ ({e})", "re-export the volume", cause=e)
    if len(shape) not in (3, 4):
        fail(path, row, source, f"'{key}' has shape {shape}, expected (C, D, H, W)",
              "save one (C, D, H, W) volume per file")
    if dtype.kind not in "biuf":
        fail(path, row, source, f"'{key}' holds {dtype} values, not numbers", "save the volume as a numeric array")
    if info.file_size < header_bytes + int(np.prod(shape)) * dtype.itemsize:
        fail(path, row, source, f"'{key}' is truncated (its {info.file_size} bytes cannot hold shape {shape})",
              "re-export the volume")


def load_input(path, *, row=None, source=None):
    """An image (PNG/JPEG/DICOM) or, for .npz, a CT volume: whatever the tower's processor takes."""
    if str(path).lower().endswith(".npz"):
        return load_volume(path, row=row, source=source)
    return load_image(path, row=row, source=source)


def check_input(path, full: bool = False, *, row=None, source=None) -> None:
    """`check_volume` for .npz, else `check_image`: what `load_input` would refuse, found early."""
    if str(path).lower().endswith(".npz"):
        check_volume(path, full, row=row, source=source)
    else:
        check_image(path, full, row=row, source=source)
