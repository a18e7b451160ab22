"""The checks a CLI runs before it loads anything, so that a wrong path or folder fails in a
second, in one line naming the flag and the fix, instead of after the models load:

`checkpoint_kind` (what a folder the user passed holds, from its files alone),
`require_checkpoint`, `require_model` (a folder or a hub id that will load), `check_weights`
(weight files cut short), `require_file`, `check_data_file` (rows counted without opening an
image), `check_output_file` (no user's file replaced without --force) and `check_run_start`
(what a training CLI checks before its output folder is written).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cli import UserError
from data_rows import DataFileError, load_table


def _config(path: Path) -> dict:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def checkpoint_kind(path) -> str:
    """What a folder holds, from its files alone (nothing is loaded):

    stage0     a Stage0 model: `towers.json` (any tower pairing) or a SiglipModel config (a
               one-SigLIP Stage0 output, or a SigLIP checkpoint to start from)
    stage1     a Stage1 export: a VLM folder holding `projection_layer/`
    stage2     a Stage2 export: the same plus `language_model/`
    vlm        a vision-language model config without this project's `projection_layer/`
    projector  a `projection_layer/` folder itself
    lm         a causal language model (`*ForCausalLM`)
    encoder    any other single model (an image or text tower)
    unknown    a file, or a folder with no model config
    missing    nothing at that path
    """
    p = Path(path)
    if not p.exists():
        return "missing"
    if not p.is_dir():
        return "unknown"
    if (p / "towers.json").is_file():
        return "stage0"
    if (p / "projection_layer" / "config.json").is_file():
        return "stage2" if (p / "language_model" / "config.json").is_file() else "stage1"
    cfg = _config(p)
    if not cfg:
        return "unknown"
    if {"in_dim", "out_dim", "depth"} <= cfg.keys():
        return "projector"
    if cfg.get("model_type") == "siglip":
        return "stage0"
    if "vision_config" in cfg and "text_config" in cfg:
        return "vlm"
    if any(str(a).endswith("ForCausalLM") for a in cfg.get("architectures") or []):
        return "lm"
    return "encoder"


_TAKES = {
    "stage0": ("a Stage0 model or a SigLIP checkpoint (image and text towers)",
               "Stage0/inference_stage0.py and Stage0/evaluate_stage0.py take it as --model_path, "
               "Stage1 and Stage2 training as --vision_model_name"),
    "stage1": ("a Stage1 export (vision tower, projector and LM)",
               "Stage2/train_vqa_stage2.py takes it as --stage1_projector_path"),
    "stage2": ("a Stage2 export (the VQA model)",
               "Stage2/inference_vqa_stage2.py and Stage2/evaluate.py take it as --model_path"),
    "vlm": ("a vision-language model without this project's projection_layer/",
            "the CLIs here read the final_model/ folders Stage1 and Stage2 write"),
    "projector": ("a projection_layer/ folder (the projector alone)",
                  "Stage2/inference_vqa_stage2.py takes it as --projector_path (with --llm_path), "
                  "Stage2/train_vqa_stage2.py as --stage1_projector_path"),
    "lm": ("a language model",
           "Stage1 and Stage2 training take it as --llm_name, Stage2/inference_vqa_stage2.py as --llm_path"),
    "encoder": ("a single {model_type} model (one tower)",
                "Stage0 training takes it as --image_model_name or --text_model_name, Stage1 and Stage2 "
                "training as --vision_model_name"),
}


def require_checkpoint(path, flag: str, accept, wanted: str, fix: str) -> str:
    """The kind of `path` if it is one of `accept`; otherwise a one-line error that says what
    the folder is, which CLI takes it, and `fix`. A missing path is a FileNotFoundError."""
    kind = checkpoint_kind(path)
    if kind in accept:
        check_weights(path, flag)
        return kind
    where = f"{flag} {path}"
    if kind == "missing":
        raise FileNotFoundError(f"{where}: the folder does not exist; {fix}")
    if kind == "unknown":
        what = ("a file, not a folder" if Path(path).is_file()
                else "no model in this folder (no config.json or towers.json)")
        raise UserError(f"{where}: {what}; {fix}")
    what, takes = _TAKES[kind]
    what = what.format(model_type=_config(Path(path)).get("model_type", "?"))
    raise UserError(f"{where}: this is {what}, not {wanted}; {takes}; {fix}")


def _rows(p: Path, flag: str) -> tuple[list, list | None]:
    """(rows, CSV columns or None) of a JSON list or a CSV file with a header."""
    try:
        rows, columns = load_table(p)
    except (DataFileError, OSError) as e:
        reason = e.reason if isinstance(e, DataFileError) else f"not readable ({e})"
        hint = "" if p.suffix.lower() == ".csv" else "; a data file is a JSON list of objects or a CSV with a header"
        raise UserError(f"{flag} {p}: {reason}{hint}") from e
    if not isinstance(rows, list):
        raise UserError(f"{flag} {p}: expected a JSON list of objects, got a JSON {type(rows).__name__}")
    return rows, columns


def check_data_file(path, flag: str, *, split_column=None, split=None, split_flag="--split") -> int:
    """The number of rows of a JSON list or a CSV data file (of one split when `split_column`
    is given), counted without opening any image, so that a missing or empty data file fails
    in a second instead of after the models load. The datasets check the rows themselves."""
    p = Path(path)
    if not p.is_file():
        what = "a directory, not a data file" if p.is_dir() else "no such file"
        raise FileNotFoundError(f"{flag} {path}: {what}; pass an existing JSON or CSV data file")
    rows, columns = _rows(p, flag)
    if split_column and columns is not None and split_column not in columns:
        raise UserError(f"{flag} {path}: no column {split_column!r} to select the {split!r} rows "
                        f"(columns: {columns}); name it with --split_column")
    n, values = 0, set()
    for r in rows:
        if not split_column:
            n += 1
            continue
        v = str(r.get(split_column)).strip() if isinstance(r, dict) and r.get(split_column) is not None else None
        n += v == split
        values.add(v)
    if not n and not values:
        raise UserError(f"{flag} {path}: the file holds no rows; fill it, or pass another file")
    if not n:
        shown = sorted(v for v in values if v is not None)
        raise UserError(f"{flag} {path}: no rows with {split_column} == {split!r} (its values: "
                        f"{', '.join(map(repr, shown[:8])) or 'none'}); pass the split's name with {split_flag}")
    return n


# ---------------------------------------------------------------- models by folder or hub id

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _cut_short(f: Path) -> str | None:
    """Why a safetensors file cannot be whole (its header says how many bytes its tensors take),
    or None. Reads the header only: a few KiB whatever the file's size."""
    import struct
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8).ljust(8, b"\0"))
            if size < 8 or 8 + n > size:
                return f"{size} bytes, shorter than its own header says"
            header = json.loads(fh.read(n))
        need = 8 + n + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"its header is unreadable ({e})"
    return f"{size} of the {need} bytes its tensors take" if size < need else None


def check_weights(folder, flag: str) -> None:
    """Refuse a model folder whose weight files are cut short (an interrupted copy, download or
    save), naming the file: safetensors' own error names neither the file nor the fix, and comes
    only after the model has half loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for f in sorted(folder.rglob("*.safetensors")):
        if "checkpoints" in f.relative_to(folder).parts:  # a run's resume state, not the model
            continue
        reason = _cut_short(f)
        if reason:
            raise UserError(f"{flag} {folder}: {f} is cut short ({reason}); copy or export the model again "
                            "(an interrupted copy, download or save leaves such a file)")


def _hub_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in {"1", "ON", "YES",
                                                                                                   "TRUE"}


def _hub_cache() -> Path:
    from huggingface_hub import constants  # read at call time: tests and users may point it elsewhere
    return Path(constants.HF_HUB_CACHE)


def _in_hub_cache(repo_id: str) -> bool:
    snapshots = _hub_cache() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def require_model(name, flag: str) -> None:
    """A model that `from_pretrained` will load, checked before anything is written or loaded: a
    local folder (its weight files whole), or a hub id `org/name`, which offline
    (HF_HUB_OFFLINE=1) must be in the local Hugging Face cache. A typo otherwise surfaces as two
    chained tracebacks from the hub client, after the run's output folder was written. Online, a
    hub id is left to the hub (a look-up here would cost every run a request)."""
    if name is None:
        return
    text = str(name)
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        check_weights(path, flag)
        return
    if path.exists():
        raise UserError(f"{flag} {name}: a file, not a model folder; pass the folder holding its config.json, or a "
                        "hub id such as org/name")
    if not _HUB_ID.match(text) or text.startswith(("~", ".")):
        raise FileNotFoundError(f"{flag} {name}: no such folder; check the path (a hub id has the form org/name)")
    if _hub_offline() and not _in_hub_cache(text):
        raise UserError(f"{flag} {name}: no such folder here, and as a hub id it is not in the local Hugging Face "
                        f"cache ({_hub_cache()}), which is all HF_HUB_OFFLINE=1 allows; check the path, or download "
                        f"the model where the hub is reachable (huggingface-cli download {name}) into that cache")


def require_file(path, flag: str, what: str = "file") -> None:
    """A file the CLI reads (not a folder), before anything loads."""
    if path is None:
        return
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {path}: " + ("a directory, not a " + what if p.is_dir()
                                                      else "no such " + what) + "; check the path")


# ---------------------------------------------------------------- files and folders a CLI writes

def check_output_file(path, flag: str, force: bool = False) -> None:
    """A file the CLI is about to write: never a folder, and never an existing file unless
    --force says to replace it (a user's predictions or metrics are not rewritten silently)."""
    if path is None:
        return
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        raise UserError(f"{flag} {path}: a directory; pass the file to write, e.g. {p / 'out'}{p.suffix}")
    if p.exists() and not force:
        raise UserError(f"{flag} {path}: the file exists; pass --force to replace it, or another {flag}")
    if p.parent.exists() and not p.parent.is_dir():
        raise UserError(f"{flag} {path}: {p.parent} is a file, not a folder; pass another {flag}")


def check_run_start(args, models: dict) -> None:
    """What a training CLI checks before its output folder, args.json or a tracker is written:
    --output_dir is not a file, every model named in `models` ({flag: name or None}) will load
    (`require_model`), and an explicit --resume_from_checkpoint is a complete checkpoint."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: a file, not a folder; pass a folder for the run's outputs")
    for flag, name in models.items():
        require_model(name, flag)
    given = getattr(args, "resume_from_checkpoint", None)
    if not given or given == "latest":
        return
    from training.checkpoints import list_checkpoints, resolve_resume
    if not Path(given).is_dir():
        found = [str(p) for p in list_checkpoints(out)] if out.is_dir() else []
        raise FileNotFoundError(f"--resume_from_checkpoint {given}: no such checkpoint folder; pass an existing "
                                f"OUTPUT_DIR/checkpoints/step_N" + (f" (here: {', '.join(found)})" if found else "")
                                + f", or 'latest' (the newest under {out / 'checkpoints'}; a fresh start when there "
                                "is none)")
    resolve_resume(out, given)  # incomplete (an interrupted save): refused the same way, before any model loads
