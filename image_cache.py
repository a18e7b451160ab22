"""Decode every image of a data set once, at the vision tower's input size, and read it back from disk.

Decoding a 2048 px 16-bit PNG or a DICOM costs tens to hundreds of milliseconds; every epoch
repeats it. `scripts/data/preprocess_images.py` decodes each image once with `image_loader.load_image`
(the same pixels training sees), resizes it to the image processor's size with the processor's
resample filter, and stores the result here. The datasets then read the small image instead, and
the processor's own resize has nothing left to do (same size in, same size out).

Where the cache lives (no flag needed in training):

    <data file's folder>/.image_cache/<key>/index.json     source -> [size, mtime_ns]
    <data file's folder>/.image_cache/<key>/ab/<hash>.npy  one image, uint8, H x W (grey) or H x W x 3

`<key>` names the target and the filter: `384x384-bicubic` for a fixed size ({"height", "width"}),
`se518-bicubic` for {"shortest_edge": 518} (aspect kept; the processor's centre crop still runs),
and `-padsquare` after it for a tower trained with --pad_to_square (the image zero-padded to a
square before the resize, image_loader.pad_to_square): a padded entry never serves an unpadded
tower or the other way round.
Set SIGLIP_MED_IMAGE_CACHE=DIR to keep caches under DIR/<key>/ instead (a read-only data folder,
a fast local disk), or SIGLIP_MED_IMAGE_CACHE=off to ignore every cache. Train, val and test files
in one folder share one cache; entries are keyed by the source's path relative to the cache, so a
data tree moved together with its `.image_cache` keeps working.

An entry is used only while its source file has the size and modification time recorded when it
was built; a changed source is decoded from disk again (the dataset logs how many are stale), and
running the script again rebuilds only stale and missing entries. CT volumes (.npz) are never
cached. Entries hold what `load_image` returns (8-bit RGB: 16-bit sources are already windowed
to 8 bits there), stored as one grey channel when the three are equal; `.npy` files can be
memory-mapped (`np.load(..., mmap_mode="r")`).

The resize is PIL's, as the processors' PIL backend does it, so pixel values are identical with
that backend. The torchvision backend's antialiased resize of uint8 images is a port of PIL's and
agrees to within one grey level; its resize of a same-size image is a no-op too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import sys
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from image_loader import ImageLoadError, load_image, pad_to_square, pads_to_square, prepare_image
from volume_loader import load_input

__all__ = ["ENV_VAR", "ImageCache", "Target", "build_cache", "cache_folder", "decode_resized", "load_cached",
           "open_cache", "refresh_command", "target_from_processor", "to_image"]

logger = logging.getLogger("siglip_med")

ENV_VAR = "SIGLIP_MED_IMAGE_CACHE"
CACHE_DIRNAME = ".image_cache"
INDEX_FILE = "index.json"
VERSION = 1
_OFF = {"off", "0", "none", "false", "no"}
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_RESAMPLE_NAME = {v: k for k, v in RESAMPLE.items()}


@dataclass(frozen=True)
class Target:
    """The size an image processor resizes to: (height, width), or its shortest edge; the PIL
    resample filter (an int, as processors store it); whether the image is zero-padded to a
    square before the resize (--pad_to_square)."""
    height: int | None = None
    width: int | None = None
    shortest_edge: int | None = None
    resample: int = RESAMPLE["bicubic"]
    pad_to_square: bool = False

    def __post_init__(self):
        if not ((self.height and self.width) or self.shortest_edge):
            raise ValueError(f"a cache target needs height and width or shortest_edge, got {self}")
        if int(self.resample) not in _RESAMPLE_NAME:
            raise ValueError(f"unknown resample filter {self.resample!r} (PIL filters: {sorted(RESAMPLE)})")

    @property
    def key(self) -> str:
        size = f"{self.height}x{self.width}" if self.height else f"se{self.shortest_edge}"
        return f"{size}-{_RESAMPLE_NAME[int(self.resample)]}" + ("-padsquare" if self.pad_to_square else "")

    def record(self) -> dict:
        """The target as the index stores it; an unpadded one exactly as before the pad existed, so
        caches built then stay valid."""
        out = asdict(self)
        if not self.pad_to_square:
            del out["pad_to_square"]
        return out

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize, as PIL's `Image.resize` takes it."""
        if self.height:
            return self.width, self.height
        # transformers' get_resize_output_image_size(default_to_square=False), which both
        # processor backends use: the short side becomes `shortest_edge`, the long side is floored.
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)


def target_from_processor(processor) -> Target | None:
    """The cache target of a Hugging Face image processor, or None when it has none (no resize,
    a size rule other than height/width or shortest_edge, a CT volume processor)."""
    size = getattr(processor, "size", None)
    if size is None or not getattr(processor, "do_resize", False):
        return None
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    resample = getattr(processor, "resample", None)
    resample = int(resample) if resample is not None else RESAMPLE["bilinear"]  # the backends' default
    if resample not in _RESAMPLE_NAME:
        return None
    pad = pads_to_square(processor)
    if get("height") and get("width") and not get("shortest_edge"):
        return Target(height=int(get("height")), width=int(get("width")), resample=resample, pad_to_square=pad)
    if get("shortest_edge") and not get("longest_edge") and not get("height"):
        return Target(shortest_edge=int(get("shortest_edge")), resample=resample, pad_to_square=pad)
    return None


def cache_root(data_file, cache_dir=None) -> pathlib.Path | None:
    """Where caches for `data_file` live: `cache_dir`, else $SIGLIP_MED_IMAGE_CACHE, else
    `.image_cache` beside the data file. None when the variable switches caching off."""
    if cache_dir:
        return pathlib.Path(os.path.expanduser(str(cache_dir)))
    env = os.environ.get(ENV_VAR, "").strip()
    if env.lower() in _OFF and env:
        return None
    if env:
        return pathlib.Path(os.path.expanduser(env))
    return pathlib.Path(os.path.abspath(str(data_file))).parent / CACHE_DIRNAME


def cache_folder(data_file, target: Target, cache_dir=None) -> pathlib.Path | None:
    root = cache_root(data_file, cache_dir)
    return None if root is None else root / target.key


def decode_resized(path, target: Target, *, row=None, source=None) -> np.ndarray:
    """`load_image(path)` (padded to a square first when the target says so) resized to `target`:
    uint8 H x W when the channels are equal (grey radiographs), else H x W x 3. Raises
    ImageLoadError like load_image."""
    image = load_image(path, row=row, source=source)
    if target.pad_to_square:  # the full decoded image, before any resize (as the tower was trained)
        image = pad_to_square(image)
    arr = np.asarray(image)
    if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
        # One band instead of three: a third of the disk and of the resize time. PIL resizes
        # each band alike, so the grey result equals every channel of the RGB one.
        image = Image.fromarray(np.ascontiguousarray(arr[..., 0]))
    size = target.output_size(*image.size)
    if size != image.size:
        image = image.resize(size, resample=int(target.resample))
    return np.asarray(image)


def to_image(arr: np.ndarray) -> Image.Image:
    """A cached array as the RGB PIL image `load_image` would have given at that size."""
    image = Image.fromarray(np.ascontiguousarray(arr))
    return image.convert("RGB") if image.mode == "L" else image


def _abs(path) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def _stamp(path) -> list[int]:
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def _is_volume(path) -> bool:
    return str(path).lower().endswith(".npz")


class ImageCache:
    """One cache folder: its target and the entries (source key -> [size, mtime_ns]) of interest.

    Picklable and small, so a Dataset can hold one and hand it to DataLoader workers."""

    def __init__(self, folder, target: Target, entries: dict[str, list[int]] | None = None):
        self.folder, self.target = pathlib.Path(folder), target
        self.entries = dict(entries or {})
        self._failed_reads = 0

    # -- keys and files
    def key(self, path) -> str:
        try:
            return os.path.relpath(_abs(path), _abs(self.folder))
        except ValueError:  # another drive (Windows): no relative path exists
            return _abs(path)

    def file_for(self, key: str) -> pathlib.Path:
        h = hashlib.sha1(key.encode("utf-8")).hexdigest()
        return self.folder / h[:2] / f"{h[2:24]}.npy"

    # -- index
    @classmethod
    def load(cls, folder, target: Target) -> ImageCache | None:
        """The cache in `folder`, or None when it has no index (never built there)."""
        index = pathlib.Path(folder) / INDEX_FILE
        if not index.is_file():
            return None
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            recorded = Target(**data["target"])
            entries = {str(k): [int(v[0]), int(v[1])] for k, v in data["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            logger.warning("image cache %s: unreadable index (%s); images are decoded from source. Rebuild it "
                           "with scripts/data/preprocess_images.py", index, e)
            return None
        if data.get("version") != VERSION or recorded != target:
            logger.warning("image cache %s was built for %s (version %s), not %s; images are decoded from source",
                           folder, recorded, data.get("version"), target)
            return None
        return cls(folder, target, entries)

    def save(self) -> None:
        """Write the index atomically (a reader sees the old or the new one, never half)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {"version": VERSION, "target": self.target.record(), "entries": self.entries}
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".index.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, self.folder / INDEX_FILE)

    # -- look up and validate
    def is_fresh(self, path) -> bool:
        rec = self.entries.get(self.key(path))
        if rec is None:
            return False
        try:
            return _stamp(path) == rec
        except OSError:
            return False

    def status(self, paths) -> dict[str, int]:
        """How many of `paths` are fresh, stale (source changed since caching) or missing."""
        out = {"fresh": 0, "stale": 0, "missing": 0}
        for p in paths:
            out["fresh" if self.is_fresh(p) else "stale" if self.key(p) in self.entries else "missing"] += 1
        return out

    def get(self, path) -> Image.Image | None:
        """The pre-resized image for `path`, or None when there is no fresh entry."""
        if not self.is_fresh(path):
            return None
        file = self.file_for(self.key(path))
        try:
            arr = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            self._failed_reads += 1
            if self._failed_reads == 1:
                logger.warning("image cache %s: cannot read %s (%s); decoding the source instead. Re-run "
                               "scripts/data/preprocess_images.py to rebuild it", self.folder, file, e)
            return None
        return to_image(arr)

    # -- build
    def write(self, path, arr: np.ndarray, stamp: list[int]) -> None:
        """Store one entry's array (atomically, so a running training never reads half a file);
        the caller records `stamp` and saves the index."""
        key = self.key(path)
        file = self.file_for(key)
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, file)


def refresh_command(data_file, target: Target, *, image_root=None, image_key=None, cache_dir=None) -> str:
    """The preprocess_images.py command that brings the cache of `data_file` up to date, runnable
    as printed from any folder: absolute paths, the folder the rows' relative image paths are
    under, the image column when it is not the default, and the target as the cache stores it."""
    import shlex
    script = pathlib.Path(__file__).resolve().parent / "scripts" / "data" / "preprocess_images.py"
    csv = str(data_file).lower().endswith(".csv")
    cmd = [sys.executable, str(script), "--data", _abs(data_file)]  # the Python that has the requirements
    if image_root or not csv:  # a JSON's relative paths without --image_root are under the working folder
        cmd += ["--image_root", _abs(image_root or os.getcwd())]
    if image_key and image_key != ("img_path" if csv else "image"):
        cmd += ["--image_key", str(image_key)]
    if target.height:
        cmd += ["--size", str(target.height), str(target.width)]
    else:
        cmd += ["--shortest_edge", str(target.shortest_edge)]
    cmd += ["--resample", _RESAMPLE_NAME[int(target.resample)]]
    if target.pad_to_square:
        cmd += ["--pad_to_square"]
    if cache_dir:
        cmd += ["--cache_dir", _abs(cache_dir)]
    return shlex.join(cmd)


def open_cache(data_file, processor, rows, *, cache_dir=None, image_root=None, image_key=None) -> ImageCache | None:
    """The cache a dataset over `data_file` reads, or None (none built, caching off, a processor
    without a cacheable size). Logs once how many of the rows' images it serves and how many are
    stale, with the command that refreshes it (`image_root`, `image_key`: as the dataset read the
    file, so that the command reads it the same way). `rows`: image paths, or row dicts with an
    `image_path`."""
    target = target_from_processor(processor)
    folder = cache_folder(data_file, target, cache_dir) if target is not None else None
    cache = ImageCache.load(folder, target) if folder is not None else None
    if cache is None:
        return None
    paths = [r["image_path"] if isinstance(r, dict) else r for r in rows]
    paths = [p for p in dict.fromkeys(paths) if not _is_volume(p)]
    keys = {cache.key(p) for p in paths}
    cache.entries = {k: v for k, v in cache.entries.items() if k in keys}  # what workers need, no more
    counts = cache.status(paths)
    if counts["fresh"] == len(paths):
        logger.info("image cache %s: all %d images of %s pre-resized", folder, len(paths), data_file)
    else:
        logger.warning("image cache %s: %d of %d images of %s pre-resized, %d stale (source changed since "
                       "caching), %d not cached; those are decoded from source. Refresh with: %s", folder,
                       counts["fresh"], len(paths), data_file, counts["stale"], counts["missing"],
                       refresh_command(data_file, target, image_root=image_root, image_key=image_key,
                                       cache_dir=cache_dir))
    return cache


def load_cached(path, *, row=None, source=None, cache: ImageCache | None = None, processor=None):
    """What the datasets call instead of `load_input`: the pre-resized image when `cache` has a
    fresh entry for `path`, else the decoded source (a CT volume always comes from its NPZ) as the
    tower behind `processor` sees it (image_loader.prepare_image: padded to a square when the
    processor records --pad_to_square). An entry is already padded: open_cache chose the cache
    folder by the same processor, padding included."""
    if cache is not None and not _is_volume(path):
        image = cache.get(path)
        if image is not None:
            return image
    return prepare_image(load_input(path, row=row, source=source), processor)


# ---------------------------------------------------------------- building

class _Jobs:
    """Decode + resize + write one entry per item (a torch Dataset, so DataLoader workers run it)."""

    def __init__(self, cache: ImageCache, jobs: list[tuple[str, object, str | None]]):
        self.cache, self.jobs = cache, jobs

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, i):
        path, row, source = self.jobs[i]
        try:
            # Stamp before decoding: a file rewritten meanwhile then reads as stale, never as fresh.
            stamp = _stamp(path)
            arr = decode_resized(path, self.cache.target)  # the row is named by build_cache's caller
            self.cache.write(path, arr, stamp)
        except (ImageLoadError, OSError) as e:
            return path, None, str(e)
        return path, stamp, int(arr.nbytes)


def _first(batch):
    return batch


def build_cache(jobs, folder, target: Target, *, num_workers: int = 0, progress: bool = True,
                save_every: int = 2000) -> dict:
    """Cache every image of `jobs` ((path, row, source) tuples, or paths) that has no fresh entry
    in `folder`. Returns counts: built, fresh (already up to date), volumes (skipped), failed
    (`FILE row N: reason` of the first row naming each image that failed), failed_paths
    ({absolute image path: reason}, for the caller to name every row), bytes written."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    folder = pathlib.Path(folder)
    cache = ImageCache.load(folder, target)
    if cache is None:
        if (folder / INDEX_FILE).is_file():  # another target or version: start it over
            logger.warning("image cache %s: rebuilding from scratch", folder)
        cache = ImageCache(folder, target)
    jobs = [j if isinstance(j, tuple) else (str(j), None, None) for j in jobs]
    seen, todo, fresh, volumes = set(), [], 0, 0
    for path, row, source in jobs:
        path = _abs(path)
        if path in seen:
            continue
        seen.add(path)
        if _is_volume(path):
            volumes += 1
        elif cache.is_fresh(path) and cache.file_for(cache.key(path)).is_file():
            fresh += 1
        else:
            todo.append((path, row, source))
    stats = {"folder": str(folder), "built": 0, "fresh": fresh, "volumes": volumes, "failed": [], "failed_paths": {},
             "bytes": 0}
    where = {path: (row, source) for path, row, source in todo}
    folder.mkdir(parents=True, exist_ok=True)
    loader = DataLoader(_Jobs(cache, todo), batch_size=None, num_workers=num_workers, collate_fn=_first)
    try:
        for path, stamp, info in tqdm(loader, total=len(todo), desc=f"caching {target.key}", unit="img",
                                      disable=not progress or not todo):
            if stamp is None:
                row, source = where[path]
                at = ("" if source is None else f"{source}: " if row is None
                      else f"{source} {row if isinstance(row, str) else f'row {row}'}: ")
                stats["failed"].append(at + info)
                stats["failed_paths"][path] = info
                continue
            cache.entries[cache.key(path)] = stamp
            stats["built"] += 1
            stats["bytes"] += info
            if stats["built"] % save_every == 0:
                cache.save()  # an interrupted run keeps what it finished
    finally:
        cache.save()
    return stats
