"""What a job on several machines needs of its output folder: one folder that every process
sees, and one answer to "which checkpoint is `latest`", the main process's.

The main process writes the checkpoints, args.json and the exports; every other process reads
them (a resume loads each process's own RNG state from the same folder). A machine whose
--output_dir is a node-local disk, or a mount that differs, would start fresh while the others
resume, or wait forever at the next collective. So before training each process looks for a
token file the main process has just written there, and the job stops on every process with
one line naming each host that cannot see it.
"""
from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

# A network file system may show a new file to another client a moment later (attribute
# caches): look again for this long before calling the folder unshared.
VISIBILITY_WAIT_S = 10.0


def from_main_process(accelerator: Accelerator, value):
    """The main process's `value`, on every process (a picklable object)."""
    if accelerator.num_processes == 1:
        return value
    box = [value if accelerator.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _sees(path: Path, token: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if path.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


def check_shared_output_dir(accelerator: Accelerator, output_dir, wait_s: float = VISIBILITY_WAIT_S) -> None:
    """Every process must see the folder the main process writes to. Call after the main
    process has created `output_dir`; every process must call it (it holds two collectives)."""
    if accelerator.num_processes == 1:
        return
    out = Path(output_dir)
    token = from_main_process(accelerator, uuid.uuid4().hex)
    path = out / f".shared_folder_check_{token}"
    if accelerator.is_main_process:
        path.write_text(token)
    accelerator.wait_for_everyone()
    seen = accelerator.is_main_process or _sees(path, token, wait_s)
    views = gather_object([(accelerator.process_index, socket.gethostname(), str(out.resolve()), seen)])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path.unlink(missing_ok=True)
    blind = [v for v in views if not v[3]]
    if blind:
        main_host = next(v[1] for v in views if v[0] == 0)
        who = "; ".join(f"process {rank} on {host} ({where})" for rank, host, where, _ in blind)
        raise SystemExit(f"error: --output_dir {out}: {who} cannot see the file the main process (on {main_host}) "
                         "wrote there, so those machines would not see its checkpoints either. Every machine needs "
                         "the same shared folder (a cluster file system such as NFS, Lustre or GPFS, not a "
                         "node-local disk): pass an --output_dir on one")
