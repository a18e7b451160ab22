"""Resume checkpoints: the output folder's identity guard, atomic writes and rotation, finding
and loading the newest complete one, and what a checkpoint holds (the trained tensors and a
fingerprint of the frozen ones)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import weakref
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from training import fsdp
from training.shared_folder import from_main_process

logger = logging.getLogger("siglip_med")


CHECKPOINT_DIR = "checkpoints"

_STATE_FILE = "trainer_state.json"

# What a resumed run must share with the run that wrote the checkpoints: the model, the data
# and the optimiser. A longer --num_epochs / --max_steps is honoured (the run continues to the
# new target); logging, workers and the like may change too.
_RUN_DEFINING = ("model_name", "image_model_name", "text_model_name", "text_model_path", "image_model_path",
                 "vision_model_name", "llm_name", "stage1_projector_path", "train_json", "val_json",
                 "label_column", "learning_rate", "weight_decay", "batch_size", "gradient_accumulation_steps",
                 "lr_scheduler", "seed", "lora_r", "text_lora_r", "freeze_text_encoder", "num_processes",
                 "freeze_image_backbone", "unfreeze_llm", "unfreeze_projection_layer", "train_ve_first_epoch")


def _move_previous_run_aside(out: Path) -> Path | None:
    """--overwrite_output_dir: the old run's whole folder (checkpoints, best_model/ with its val
    loss, metrics.jsonl, exports) goes to a dated sibling, named in the log. Deleting only its
    checkpoints left best_model/ and final_model/ beside the new run and appended to its
    metrics.jsonl; deleting anything before the new run's data check passed lost the old run
    to a typo. Nothing is deleted: remove the sibling when it is no longer wanted."""
    if not out.is_dir() or not any(out.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out.with_name(f"{out.name}.previous-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = out.with_name(f"{out.name}.previous-{stamp}-{n}")
    out.rename(aside)
    logger.warning("--overwrite_output_dir: the previous run in %s was moved to %s (nothing deleted)", out, aside)
    return aside


def check_output_dir(args) -> None:
    """An output folder holding another run is never reused silently: a fresh run (no
    --resume_from_checkpoint) into a folder with checkpoints or a final model refuses to start,
    as does a `latest` resume whose model, data or schedule differ from the saved run's, each
    naming what differs; --overwrite_output_dir starts over."""
    out = Path(args.output_dir)
    _check_explicit_checkpoint(args)
    if getattr(args, "overwrite_output_dir", False) or not out.is_dir():
        return
    has_run = bool(list_checkpoints(out)) or (out / "final_model").is_dir()
    if not has_run:
        return
    fix = "pass --overwrite_output_dir to start over there, or choose another --output_dir"
    if not args.resume_from_checkpoint:
        raise SystemExit(f"error: {out} holds another run's checkpoints or final_model/; a fresh run there would "
                         f"mix with them (rotation would delete its own newest checkpoints). {fix}; or resume it "
                         "with --resume_from_checkpoint latest.")
    saved = out / "args.json"
    if args.resume_from_checkpoint == "latest" and saved.is_file() and list_checkpoints(out):
        changed = _changed_settings(saved, args)
        if changed:
            raise SystemExit(f"error: --resume_from_checkpoint latest would continue the run in {out}, but this run "
                             f"differs from it: {'; '.join(changed)}. {fix}.")


def _changed_settings(saved_args: Path, args) -> list[str]:
    try:
        before = json.loads(saved_args.read_text())
        if not isinstance(before, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:  # cut short by a crash, or edited by hand: the checkpoints still resume
        logger.warning("%s is unreadable (%s); the run's settings cannot be compared with this one's, and this "
                       "run's replace it", saved_args, e)
        return []
    now = json.loads(json.dumps(vars(args), default=str))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in _RUN_DEFINING
            if k in now and k in before and before[k] != now[k]]


def _check_explicit_checkpoint(args) -> None:
    """A checkpoint path given explicitly must come from a run with this run's model, data,
    optimiser and process count; otherwise it would be half-loaded (shapes that happen to fit)
    or resumed onto another data order. Refused before anything loads, naming what differs."""
    given = args.resume_from_checkpoint
    if not given or given == "latest":
        return
    ckpt = Path(given)
    saved = ckpt.parent.parent / "args.json"
    if ckpt.parent.name != CHECKPOINT_DIR or not saved.is_file():
        return
    changed = _changed_settings(saved, args)
    if changed:
        raise SystemExit(f"error: --resume_from_checkpoint {ckpt} was written by a run with other settings: "
                         f"{'; '.join(changed)}. Resume it with that run's settings (see {saved}), or start "
                         "fresh without --resume_from_checkpoint.")


_last_saved: dict = {}  # (output dir, step) of this process's newest save


def save_checkpoint(accelerator: Accelerator, output_dir, step: int, state: dict,
                    total_limit: int | None = 2) -> Path:
    """Write OUTPUT_DIR/checkpoints/step_N atomically: save into a temporary folder, write
    trainer_state.json (the completion marker) last, and rename it when complete, so a save
    cut short (a crash, a kill past the grace period) never looks like a checkpoint and the
    previous one stays. Rotation keeps the newest `total_limit` complete ones.
    Every process must call this (accelerate saves per-process RNG states)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    if _last_saved.get("key") == (str(Path(output_dir).resolve()), step) and final.is_dir():
        # A periodic save met an epoch end or the last step: the weights, optimizer and RNG
        # are the ones just written; only the position moves on (epoch + 1, batch 0), so a
        # resume does not replay the epoch's end. Every process takes this branch alike.
        if accelerator.is_main_process:
            part = final / (_STATE_FILE + ".tmp")
            part.write_text(json.dumps({"step": step, **state}, indent=2))
            part.replace(final / _STATE_FILE)
        accelerator.wait_for_everyone()
        return final
    if accelerator.is_main_process:
        for stale in root.glob(".tmp_step_*"):  # left by a save that was cut short
            shutil.rmtree(stale, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    with fsdp.accelerate_saves_the_rest(accelerator) as held:
        accelerator.save_state(str(tmp), safe_serialization=True)
    if held is not None:  # FSDP: the trained tensors and the optimizer, each process its shards
        fsdp.save_sharded(tmp, held, _trained_tensors(accelerator, held))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / _STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        # Not accelerate's ProjectConfiguration(total_limit): it rotates only its own automatic
        # checkpoint_N names, saved in place, so a save cut short would count as a checkpoint.
        if total_limit and total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved resume checkpoint %s", final)
    accelerator.wait_for_everyone()
    _last_saved["key"] = (str(Path(output_dir).resolve()), step)
    return final


def list_checkpoints(output_dir) -> list[Path]:
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.name[5:].isdigit() and (p / _STATE_FILE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def _incomplete_checkpoints(output_dir) -> list[Path]:
    """step_N folders without their completion marker (copied in part, or written by a tool
    that does not save atomically): never resumed from."""
    root = Path(output_dir) / CHECKPOINT_DIR
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not (p / _STATE_FILE).exists())


def resolve_resume(output_dir, resume_from_checkpoint) -> Path | None:
    """'latest' -> the newest complete checkpoint (None if there is none yet, so a launcher
    can always pass --resume_from_checkpoint latest); a path must exist."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info("no checkpoint under %s/%s; starting fresh", output_dir, CHECKPOINT_DIR)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not (path / _STATE_FILE).exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: not a complete checkpoint "
                                f"(no {_STATE_FILE}); use 'latest' or one of "
                                f"{[str(p) for p in list_checkpoints(output_dir)]}")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    """Restore model/optimizer/scheduler/RNG state; return the trainer state dict
    (step, epoch, batches done in that epoch, ...)."""
    with fsdp.accelerate_saves_the_rest(accelerator) as held:
        accelerator.load_state(str(path))
    _legacy_optimizer_state(accelerator)
    if held is not None:
        fsdp.load_sharded(path, held, _trained_tensors(accelerator, held))
    state = json.loads((Path(path) / _STATE_FILE).read_text())
    logger.info("resumed from %s (step %d)", path, state["step"])
    return state


def resume_from(accelerator: Accelerator, output_dir, resume_from_checkpoint) -> dict | None:
    """Load the checkpoint to resume from; return its trainer state, or None to start fresh.
    With 'latest', a damaged newest checkpoint (a missing or truncated file) is passed over,
    with a warning naming it, for the newest one that loads; a path given explicitly must load."""
    _last_saved.clear()  # a new run in this process: its saves are its own
    if resume_from_checkpoint != "latest":
        path = resolve_resume(output_dir, resume_from_checkpoint)
        return load_checkpoint(accelerator, path) if path is not None else None
    # The main process's list, on every process: a machine whose view of the folder lags (a
    # network file system's cache) still resumes the checkpoint the others resume.
    candidates = [Path(p) for p in from_main_process(accelerator, [str(p) for p in list_checkpoints(output_dir)[::-1]])]
    for path in _incomplete_checkpoints(output_dir):
        logger.warning("checkpoint folder %s is incomplete (no %s: its save was cut short); ignored", path,
                       _STATE_FILE)
    for path in candidates:
        try:
            state, error = load_checkpoint(accelerator, path), None
        except Exception as e:  # a crash mid-save on another filesystem, a disk error, a deleted file
            state, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        # Every process falls back together when any one of them cannot load its part.
        errors = [e for e in (gather_object([error]) if accelerator.num_processes > 1 else [error]) if e]
        if not errors:
            return state
        logger.warning("checkpoint %s is damaged (%s); falling back to the one before it", path, errors[0])
    if candidates:
        raise SystemExit(f"error: none of the {len(candidates)} checkpoints under {Path(output_dir) / CHECKPOINT_DIR} "
                         "loads (see the warnings above); pass --overwrite_output_dir to start over")
    logger.info("no checkpoint under %s/%s; starting fresh", output_dir, CHECKPOINT_DIR)
    return None


FROZEN_FINGERPRINT_FILE = "frozen_weights.json"

ACCELERATE_MODEL_FILE = "model.safetensors"  # accelerate's own name for a checkpoint's model file

_registered = weakref.WeakKeyDictionary()  # accelerator -> its TrainableOnlyCheckpoints


def _trained_tensors(accelerator, held) -> dict:
    """What an FSDP checkpoint holds: the registered TrainableOnlyCheckpoints' tensors, else
    every parameter of the prepared model that requires grad."""
    ckpt = _registered.get(accelerator)
    if ckpt is not None:
        return ckpt.state()
    return {n: p for n, p in held[0][0].named_parameters() if p.requires_grad}


def weights_fingerprint(tensors: dict, stored_dtypes: dict | None = None, *, also_0d: bool = False) -> dict:
    """A content hash (sha256) of `tensors`: each one's name, shape, dtype and raw bytes.
    Tensors that master_weights widened are hashed in the dtype they were stored in (exact:
    bf16 -> fp32 -> bf16 is lossless), so a resume under another --mixed_precision still
    matches. Tensors are hashed on threads (hashlib and the device copy release the GIL), then
    combined in name order: an 8B tower takes seconds.

    also_0d: add "sha256_0d", the hash with each shape-[1] tensor hashed as 0-d. The towers'
    logit scale and bias were 0-d before they took SiglipModel's shape [1] (FSDP shards no 0-d
    parameter); a checkpoint written then recorded that hash. Only those tiny tensors are hashed
    twice."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor
    stored = stored_dtypes or {}

    def one(item, shape=None):
        name, t = item
        t = t.detach()
        if name in stored and t.dtype != stored[name]:
            t = t.to(stored[name])
        h = hashlib.sha256(f"{name}|{shape if shape is not None else tuple(t.shape)}|{t.dtype}|".encode())
        if t.device.type != "meta" and t.numel():
            h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        return h.digest(), t.numel() * t.element_size()

    def combine(digests):
        total = hashlib.sha256()
        for digest in digests:
            total.update(digest)
        return total.hexdigest()

    items = sorted(tensors.items())
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        hashed = list(pool.map(one, items))
    out = {"sha256": combine(d for d, _ in hashed), "tensors": len(items), "bytes": sum(n for _, n in hashed)}
    if also_0d:
        out["sha256_0d"] = combine(one(item, shape=())[0] if tuple(item[1].shape) == (1,) else d
                                   for item, (d, _) in zip(items, hashed))
    return out


def _saved_0d(saved: torch.Tensor, live: torch.Tensor) -> bool:
    """Whether `saved` is the 0-d form of shape-[1] `live`: the towers' logit scale and bias (and
    their optimizer moments) in checkpoints written before they took shape [1]."""
    return saved.dim() == 0 and tuple(live.shape) == (1,)


def _legacy_shape(saved: torch.Tensor, live: torch.Tensor, what: str) -> torch.Tensor:
    """`saved` in `live`'s shape: a 0-d tensor saved for a shape-[1] one (_saved_0d) is reshaped;
    any other difference is an error, where copy_ would broadcast it silently."""
    if saved.shape == live.shape:
        return saved
    if _saved_0d(saved, live):
        return saved.reshape(1)
    raise ValueError(f"{what} has shape {tuple(saved.shape)} in the checkpoint, {tuple(live.shape)} in this run's "
                     "model: the checkpoint was written for another model")


def _legacy_optimizer_state(accelerator: Accelerator) -> None:
    """Optimizer moments saved 0-d for shape-[1] parameters (_saved_0d) take the parameters'
    shape (torch's load_state_dict keeps the saved shapes, and Adam's in-place update then fails
    on the mismatch). Adam's 0-d step count is not a moment and stays as it is."""
    for optimizer in accelerator._optimizers:
        inner = getattr(optimizer, "optimizer", optimizer)
        for p, state in inner.state.items():
            for k, v in state.items():
                if k != "step" and torch.is_tensor(v) and _saved_0d(v, p):
                    state[k] = v.reshape(1)


class TrainableOnlyCheckpoints:
    """Resume checkpoints that hold the trained tensors, not the whole model, for every stage.

    accelerate's save_state writes the whole model into every checkpoint: a frozen 8B text
    tower (16 GB) per checkpoint fills the disk and cannot be written within a preemption's
    grace period, although it never changes and the run reloads it from where it came from at
    every start. Here a checkpoint holds the trained tensors (`filename`), next to accelerate's
    optimizer, scheduler and RNG states, and a fingerprint of the frozen ones taken once at
    startup (FROZEN_FINGERPRINT_FILE): a resume onto other frozen weights is refused in one line
    instead of silently pairing trained tensors with a model they were not trained with.

    `module` is the plain model (not a DDP wrapper). Its tensors are recorded here, so a wrapper
    later put around any part (Stage1's projector) changes nothing. `keeps(name, parameter)`
    chooses the trained parameters (default: those that require grad now: LoRA adapters only,
    for a LoRA run); Stage2 also keeps the vision tower that trains in epoch 1 only. A buffer is
    state of the nearest module that holds parameters (BatchNorm statistics belong to its
    affine weights): trained when that module trains (Merlin's BatchNorm in phase 2), frozen
    and fingerprinted when not (phase 1's frozen backbone, kept in eval mode).

    A checkpoint without the fingerprint file was written whole by accelerate (by this code
    before trained-only checkpoints): accelerate loads it as before. Under DeepSpeed the engine
    writes its own checkpoint and nothing is registered. Under FSDP the trained tensors go into
    the checkpoint's sharded part (training/fsdp.py), each process its shards; the fingerprint
    file is written and checked as here."""

    def __init__(self, accelerator: Accelerator, module: torch.nn.Module, keeps=None,
                 filename: str = ACCELERATE_MODEL_FILE, stored_dtypes: dict | None = None):
        from accelerate.utils import DistributedType
        self.acc, self.filename, self.module = accelerator, filename, module
        keeps = keeps or (lambda name, p: p.requires_grad)
        params = dict(module.named_parameters())
        self._params = {n: p for n, p in params.items() if keeps(n, p)}
        frozen = {n: p for n, p in params.items() if n not in self._params}
        self._buffers: dict[str, tuple[torch.nn.Module, str]] = {}  # looked up at save: .to() replaces buffers
        modules = dict(module.named_modules())
        for mod_name, m in modules.items():
            for b, t in m._buffers.items():
                if t is None or b in m._non_persistent_buffers_set:
                    continue
                name = f"{mod_name}.{b}" if mod_name else b
                if self._owner_trains(mod_name, modules):
                    self._buffers[name] = (m, b)
                else:
                    frozen[name] = t
        self.fingerprint = None
        if accelerator.distributed_type != DistributedType.DEEPSPEED:
            t0 = time.time()
            self.fingerprint = weights_fingerprint(frozen, stored_dtypes, also_0d=True)
            self._sha_0d = self.fingerprint.pop("sha256_0d")  # what a checkpoint from then recorded
            logger.info("resume checkpoints hold %d trained tensors; the %d frozen ones (%.2f GB) are "
                        "fingerprinted instead (%.1fs)", len(self.names), self.fingerprint["tensors"],
                        self.fingerprint["bytes"] / 1e9, time.time() - t0)
            accelerator.register_save_state_pre_hook(self._save)
            accelerator.register_load_state_pre_hook(self._load)
            _registered[accelerator] = self

    def _owner_trains(self, mod_name: str, modules: dict) -> bool:
        owner = mod_name
        while owner and next(modules[owner].parameters(), None) is None:
            owner = owner.rpartition(".")[0]
        prefix = f"{owner}." if owner else ""
        return any(n.startswith(prefix) for n in self._params)

    @property
    def names(self) -> list[str]:
        return sorted([*self._params, *self._buffers])

    def trains(self, prefix: str) -> bool:
        """Whether any tensor under `prefix` is trained state (else that part never changes)."""
        return any(n.startswith(prefix) for n in self.names)

    def state(self) -> dict[str, torch.Tensor]:
        if fsdp.is_fsdp(self.acc):
            # fully_shard replaced each parameter by a sharded one, in place and under its name.
            live = dict(self.module.named_parameters())
            out = {n: live[n] for n in self._params}
            out.update({n: m._buffers[b] for n, (m, b) in self._buffers.items()})
            return out
        out = dict(self._params)
        out.update({n: m._buffers[b] for n, (m, b) in self._buffers.items()})
        return out

    def _save(self, models, weights, output_dir):
        weights.clear()  # accelerate writes no whole-model file
        if not self.acc.is_main_process:
            return
        from safetensors.torch import save_file
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if fsdp.is_fsdp(self.acc):  # the trained tensors go into the sharded checkpoint
            (out / FROZEN_FINGERPRINT_FILE).write_text(json.dumps(self.fingerprint, indent=2))
            return
        save_file({n: t.detach().to("cpu").contiguous() for n, t in self.state().items()}, str(out / self.filename))
        (out / FROZEN_FINGERPRINT_FILE).write_text(json.dumps(self.fingerprint, indent=2))

    def _load(self, models, input_dir):
        folder = Path(input_dir)
        path, record = folder / self.filename, folder / FROZEN_FINGERPRINT_FILE
        if not record.is_file():
            if self.filename == ACCELERATE_MODEL_FILE or not path.is_file():
                return  # written whole by accelerate: it loads it
            logger.warning("%s has no %s (written before frozen weights were fingerprinted): the frozen "
                           "weights are not checked", folder, FROZEN_FINGERPRINT_FILE)
        else:
            saved = json.loads(record.read_text()).get("sha256")
            if saved == self._sha_0d and saved != self.fingerprint["sha256"]:
                logger.info("%s was written when the logit scale and bias were 0-d; they are read as shape [1]",
                            folder)
            elif saved != self.fingerprint["sha256"]:
                message = (f"error: checkpoint {folder} was trained on other frozen weights than this run loaded "
                           f"(fingerprint {str(saved)[:16]} there, {self.fingerprint['sha256'][:16]} here; or the "
                           "same ones stored in another dtype): its trained tensors belong to that model. Resume "
                           "with the towers/checkpoints that run started from, or start over with "
                           "--overwrite_output_dir.")
                raise SystemExit(message if self.acc.is_main_process else 1)
        if fsdp.is_fsdp(self.acc):
            return  # the trained tensors are the sharded checkpoint's (load_checkpoint)
        from safetensors.torch import load_file
        held = load_file(str(path))  # a missing file raises: `latest` then takes the checkpoint before
        mine = self.state()
        unexpected, missing = sorted(set(held) - set(mine)), sorted(set(mine) - set(held))
        if unexpected:
            raise ValueError(f"{path}: holds weights this run does not train ({unexpected[:3]}...); it was "
                             "written by a run with another model or LoRA setup")
        if missing:
            raise ValueError(f"{path}: lacks trained weights {missing[:3]}...; it was written by a run that "
                             "trained other parts (--unfreeze_*/--lora_r/--train_ve_first_epoch/--freeze_* differ)")
        with torch.no_grad():
            for n, t in mine.items():
                t.copy_(_legacy_shape(held[n], t, f"{path}: {n}"))
        models.clear()  # loaded here; accelerate looks for no whole-model file
