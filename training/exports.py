"""Exports: one copy of what did not change between a run's exported folders, and LoRA
adapters merged into the exported weights."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


def same_bytes(a, b, chunk: int = 1 << 20) -> bool:
    """Two files with the same bytes (stops at the first block that differs: a trained tower
    differs within its first megabyte)."""
    a, b = Path(a), Path(b)
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def link_or_copy_unchanged(path, first, *, copy: bool = True) -> bool:
    """Make `path` the file `first` is: a hard link to it (one copy on disk; each folder still
    holds a whole file and loads on its own), or, where the file system refuses links (another
    device, no link support), a copy (`copy=False`: leave `path` as it is). True when linked."""
    path, first = Path(path), Path(first)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.link-tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(first, tmp)
        linked = True
    except OSError:
        if not copy:
            return False
        shutil.copy2(first, tmp)
        linked = False
    os.replace(tmp, path)
    return linked


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".link-tmp"))


class ExportCopies:
    """One copy on disk of each export file that an earlier export of the run already holds.

    A frozen tower is the same in every epoch_N/, best_model/ and final_model/; written into
    each, a 16 GB text tower costs 16 GB per epoch. Each folder stays self-contained: a hard
    link is a whole file, and deleting one folder leaves the others intact.

    - before_write(out): a folder written again (best_model/) first drops the files it shares
      with other folders, so the new write cannot go through a link into their copy.
    - link_parts(out, parts): parts (a subfolder or file) that cannot have changed (a frozen
      tower) are linked from a copy this process wrote, and not written at all.
    - after_write(out, parts): every written file byte-identical to the first copy of the same
      relative path (in this process's exports, or in the run's exports already on disk after a
      resume) becomes a link to it; `parts` are recorded as complete in `out`."""

    PATTERNS = ("epoch_*", "best_model", "final_model")

    def __init__(self, output_dir):
        self.root = Path(output_dir)
        self.first: dict[str, Path] = {}
        self.written: dict[str, list[Path]] = {}

    def before_write(self, out) -> None:
        out = Path(out)
        if out.is_dir():
            for f in _files(out):
                if f.stat().st_nlink > 1:
                    f.unlink()

    def link_parts(self, out, parts) -> set[str]:
        out, linked = Path(out), set()
        for part in parts:
            sources = [f / part for f in self.written.get(part, []) if f != out and (f / part).exists()]
            if not sources:
                continue
            src, dst = sources[0], out / part
            if dst.is_dir():
                shutil.rmtree(dst)
            if src.is_file():
                link_or_copy_unchanged(dst, src)
            else:
                for f in _files(src):
                    link_or_copy_unchanged(dst / f.relative_to(src), f)
            linked.add(part)
        return linked

    def _on_disk(self, out: Path, rel: Path) -> Path | None:
        """The oldest export of the run already on disk (a resumed run's) holding `rel`."""
        def order(p):
            return (0, int(p.name[6:])) if p.name[6:].isdigit() else (1, p.name)
        folders = sorted((p for pat in self.PATTERNS for p in self.root.glob(pat) if p.is_dir() and p != out),
                         key=order)
        return next((f / rel for f in folders if (f / rel).is_file()), None)

    def after_write(self, out, parts=()) -> None:
        out = Path(out)
        for f in _files(out):
            rel = f.relative_to(out)
            key = str(rel)
            first = self.first.get(key)
            if first is None or not first.is_file():
                first = self._on_disk(out, rel)
            if first is None or first == f:
                self.first[key] = f
                continue
            if os.path.samefile(first, f) or (same_bytes(first, f) and link_or_copy_unchanged(f, first, copy=False)):
                self.first[key] = first
            elif key not in self.first or not self.first[key].is_file():
                self.first[key] = f
        for part in parts:
            if (out / part).exists():
                self.written.setdefault(part, []).append(out)


def add_lora_deltas(state: dict, peft_module, key_of=lambda name: name, weights: dict | None = None) -> dict:
    """Merge every LoRA adapter of `peft_module` into `state` (a state dict of the weights as
    loaded from the checkpoint): W + B·A·alpha/r computed in fp32 on CPU and stored in W's own
    dtype. `key_of` maps a LoRA module's name to its key prefix in `state`. merge_and_unload
    would add the delta into whatever copy the model trains (bf16), misplacing it by 3-30%.
    `weights`: {name under `peft_module`: full tensor} to read the adapters from instead of the
    modules (under FSDP the modules hold shards)."""
    from peft.tuners.lora import LoraLayer

    def adapter(name, module, part):
        if weights is not None:
            return weights[f"{name}.{part}.default.weight"]
        return getattr(module, part)["default"].weight

    with torch.no_grad():
        for name, module in peft_module.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                key = key_of(name) + ".weight"
                a = adapter(name, module, "lora_A").detach().to("cpu", torch.float32)
                b = adapter(name, module, "lora_B").detach().to("cpu", torch.float32)
                state[key] = (state[key].float() + (b @ a) * module.scaling["default"]).to(state[key].dtype)
    return state
