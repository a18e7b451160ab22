"""What every command-line entry point shares: a user error becomes one line on standard error,
`error: <what is wrong, with the path or flag, and the fix>` (a message that lists several bad
rows keeps its list under that line), and exit status 2; bugs keep their traceback.

    if __name__ == "__main__":
        cli.run(main)

A user error is `UserError` (raised here and by the CLIs' own checks), `ImageLoadError`, a
missing path (`FileNotFoundError`, `IsADirectoryError`, `NotADirectoryError`), a `ValueError`
raised by this project's own modules (their messages are written for users: a bad row, a
projector that does not fit) and `raise SystemExit("error: ...")`. A `ValueError` raised inside
torch or transformers is a bug until shown otherwise and keeps its traceback, as does every
other exception. SIGLIP_MED_TRACEBACK=1 shows the traceback of user errors too.

The checks a CLI runs before it loads anything (paths, data files, model and checkpoint folders,
files it writes) live in `preflight.py`.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from image_loader import ImageLoadError

ROOT = Path(__file__).resolve().parent
TRACEBACK_ENV = "SIGLIP_MED_TRACEBACK"
EXIT_USER_ERROR = 2  # argparse's status for a bad command line


class UserError(ValueError):
    """Something the user can fix (a path, a flag, a data file); the message says what and how."""


# ---------------------------------------------------------------- the entry point

def _lines(message) -> list[str]:
    text = str(message).strip()
    if "Traceback (most recent call last)" in text:
        # Re-raised from a DataLoader worker: the message holds the worker's traceback, whose
        # last line is the original "module.Error: message".
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = re.sub(r"^[\w.]+: ", "", last.strip())
    return [ln.rstrip() for ln in text.splitlines() if ln.strip()] or ["(no message)"]


def one_line(message) -> str:
    """`error: <message>` on one line."""
    text = " ".join(ln.strip() for ln in _lines(message))
    return text if text.startswith("error:") else f"error: {text}"


def error_text(message) -> str:
    """`error: <message>`: one line, except that a message listing several things (bad rows, a
    projector's mismatches) keeps its list, indented under the first line."""
    head, *rest = _lines(message)
    head = head.strip() if head.strip().startswith("error:") else f"error: {head.strip()}"
    return "\n".join([head] + ["  " + ln.strip() if not ln.startswith(" ") else ln for ln in rest])


def _raised_by_project(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    return path.is_relative_to(ROOT) and not {".venv", "site-packages"} & set(path.relative_to(ROOT).parts)


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (UserError, ImageLoadError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return True
    return isinstance(exc, ValueError) and _raised_by_project(exc)


def _report(message) -> None:
    rank = os.environ.get("RANK")
    text = error_text(message)
    if rank not in (None, "0"):  # under accelerate launch every process reports; say which one
        text = text.replace("error:", f"error: [rank {rank}]", 1)
    print(text, file=sys.stderr, flush=True)


class _DefaultSiglipIds(logging.Filter):
    """transformers writes a config as its difference from a default config of its class, and
    SigLIP's default text config (32,000 tokens; bos/eos 49406/49407, ids of CLIP's vocabulary)
    fails its own token-id check: every SigLIP save and print warns about ids that the model at
    hand does not have. Only that default's warning is dropped."""

    def filter(self, record):
        return "(between 0 and 31999), got 4940" not in record.getMessage()


def quiet_library_noise() -> None:
    logger = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, _DefaultSiglipIds) for f in logger.filters):
        logger.addFilter(_DefaultSiglipIds())


def run(main, argv=None):
    """Call `main(argv)` as a command-line entry point: a user error prints one `error:` line
    and exits with status 2, anything else propagates with its traceback."""
    quiet_library_noise()
    try:
        return main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):  # raise SystemExit("error: ..."): the project's refusals
            _report(e.code)
            raise SystemExit(EXIT_USER_ERROR) from None
        raise
    except Exception as e:
        if os.environ.get(TRACEBACK_ENV) or not is_user_error(e):
            raise
        _report(e)
        raise SystemExit(EXIT_USER_ERROR) from None


def help_requested(argv=None) -> bool:
    """Whether the command line asks for --help. An entry point defines its parser above its
    heavy imports and, when this is true, parses before them: torch, transformers and
    accelerate take seconds to import, and help should not wait for them.

        if __name__ == "__main__" and cli.help_requested():
            parse_args()  # prints the help and exits
        import torch  # the heavy imports after it"""
    args = sys.argv[1:] if argv is None else argv
    return any(a in ("-h", "--help") for a in args)


def default_device() -> str:
    """--device when not given: the GPU when one is visible."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error format: one `error:` line and exit status 2, without
    the usage block argparse prints first (--help shows it)."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, one_line(message) + "\n")


# ---------------------------------------------------------------- the training CLIs' shared flags

def _at_least(low, kind, strict=False):
    """An argparse type: a number of `kind` >= low (> low if strict), else one error line naming
    the bound (a batch size of 0 used to surface as a torch traceback, an accumulation of 0 as a
    ZeroDivisionError)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text}: must be {'>' if strict else '>='} {low}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int, non_negative_int = _at_least(1, int), _at_least(0, int)
positive_float = _at_least(0.0, float, strict=True)


# Answer length of the VQA CLIs, and of the exported generation config (vlm.py).
DEFAULT_MAX_NEW_TOKENS = 256
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every stage shares; each stage adds its own model/data flags."""
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", "--save_dir", dest="output_dir", required=True)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16", "auto"], default="no", nargs="?",
                   const="auto", help="autocast precision; given alone: bf16 where supported, else fp16")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    g.add_argument("--num_workers", type=non_negative_int, default=2, help="DataLoader workers")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="<=0 disables clipping")
    g.add_argument("--warmup_ratio", type=float, default=0.05)
    g.add_argument("--warmup_steps", type=int, default=None, help="overrides --warmup_ratio")
    g.add_argument("--lr_scheduler", choices=["cosine", "linear", "constant", "one_cycle"], default="cosine",
                   help="after the warmup; one_cycle: torch's OneCycleLR (cosine up over the warmup, then down)")
    g.add_argument("--max_steps", type=positive_int, default=None,
                   help="the total number of optimizer steps, repeating epochs as needed; wins over "
                        "--num_epochs, and the LR schedule spans exactly these steps (default: --num_epochs epochs)")
    g.add_argument("--group_by_length", action="store_true",
                   help="Stage1/Stage2: batch samples of similar token length together (less padding)")
    # Reliability: non-finite steps (SIGTERM/SIGUSR1 preemption needs no flag).
    g.add_argument("--max_nonfinite_steps", type=positive_int, default=10,
                   help="stop, with a resume checkpoint and exit status 2, after this many optimizer steps in a "
                        "row were skipped for a NaN/inf loss or gradient norm (fp16 loss scaling skips a few "
                        "while it calibrates)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--report_to", choices=["wandb", "tensorboard", "none"], default="wandb",
                   help="falls back to tensorboard, then none, if the tracker cannot start")
    g.add_argument("--wandb_project", "--project_name", dest="wandb_project", default="siglip-med")
    g.add_argument("--run_name", "--experiment_name", dest="run_name", default=None)
    g.add_argument("--logging_steps", "--log_interval", dest="logging_steps", type=positive_int, default=10)
    g.add_argument("--log_level", choices=["debug", "info", "warning"], default="info",
                   help="the console log of the main process; debug also shows accelerate's line per file saved")
    g.add_argument("--checkpointing_steps", "--save_interval", dest="checkpointing_steps", type=int, default=0,
                   help="save resumable state every N optimizer steps (0: only at epoch ends)")
    g.add_argument("--checkpoints_total_limit", type=int, default=2,
                   help="keep the newest N resume checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' or a path to OUTPUT_DIR/checkpoints/step_N")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start over in an output folder that holds another run: the old run is moved to a dated "
                        "sibling folder, OUTPUT_DIR.previous-YYYYmmdd-HHMMSS (nothing is deleted)")
    g = p.add_argument_group("speed and memory")
    g.add_argument("--attn_implementation", default="sdpa", choices=ATTN_IMPLEMENTATIONS,
                   help="attention kernel of every Hugging Face tower (flash_attention_2 needs flash-attn)")
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute the activations of every block gradients flow through (trained or "
                        "frozen) in backward: much less memory, ~30%% slower")
    g.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false",
                   help=argparse.SUPPRESS)
    g.add_argument("--torch_compile", action="store_true",
                   help="torch.compile the towers and the LM (the first steps compile; weights and "
                        "checkpoints are unchanged)")
    g.add_argument("--torch_compile_backend", default="inductor", help=argparse.SUPPRESS)
    g.add_argument("--torch_compile_mode", default=None,
                   choices=[None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    g = p.add_argument_group("bad data (checked before the first step: see data_check.py)")
    g.add_argument("--on_bad_sample", choices=["error", "skip"], default="error",
                   help="rows whose image is missing or unreadable, or whose text is empty: error stops before "
                        "training and lists them all; skip drops them (OUTPUT_DIR/dropped_rows.json) and replaces "
                        "a sample that stops loading mid-run with the next readable row")
    g.add_argument("--full_decode_check", action="store_true",
                   help="check by decoding every image and reading every volume (finds e.g. a truncated DICOM "
                        "frame or a NaN in a CT volume); default: headers only")
    return p


# ---------------------------------------------------------------- checks before anything loads

def check_device(parser: argparse.ArgumentParser, device: str | None) -> str:
    """Refuse (via parser.error) a --device this machine does not have, before a model loads.
    None (not given): the GPU when one is visible, else the CPU."""
    import torch
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        parser.error(f"--device {device}: not a device name; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {device}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                         "use --device cpu, or run where a GPU and a CUDA build of torch are")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            parser.error(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        parser.error(f"--device {device}: MPS is not available here; use --device cpu")
    return device
