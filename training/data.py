"""Data helpers of the training loop: epoch order, accumulation windows, evaluation shards, the
length-grouped sampler and the DataLoader settings every stage shares."""
from __future__ import annotations

import signal

import torch
from accelerate import Accelerator


def epoch_batches(accelerator: Accelerator, dataloader, epoch: int, skip_batches: int = 0):
    """The dataloader for one epoch, in the order a fresh run would see it; on resume the
    first `skip_batches` are skipped without loading them twice."""
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)
    return _RngNeutral(accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader)


class _RngNeutral:
    """Iterates an epoch's loader without touching the global torch RNG. A DataLoader draws
    its workers' base seed from the global RNG when its iterator is made, and when that
    happens depends on the run's history, not on the step: a resumed run makes one mid-epoch
    just after the checkpoint's RNG state was restored, and with persistent workers an
    uninterrupted run makes one in its first epoch only, while a run resumed at a later epoch
    makes its first there. Any such draw shifts every dropout mask (LoRA dropout) after it, so
    no epoch's iterator may draw at all."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        state = torch.get_rng_state()
        it = iter(self.loader)
        first = next(it, _RngNeutral)  # accelerate's loaders make the DataLoader iterator lazily
        torch.set_rng_state(state)
        if first is not _RngNeutral:
            yield first
            yield from it


def shard_batches(n: int, batch_size: int, rank: int, world: int, even: bool = False) -> tuple[list, int, int]:
    """(this process's batches, how many of them are real, all batches): the file-order batches
    of `n` samples, process `rank` taking batches rank, rank + world, ... With `even` (FSDP, where
    every forward is a collective), a process short of the most any process has is topped up with
    the first batch, which the caller runs and drops."""
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    mine = batches[rank::world]
    real = len(mine)
    if even:
        mine += batches[:1] * (-(-len(batches) // world) - real)
    return mine, real, len(batches)


# Not accelerate's prepared loader + gather_for_metrics: even batches repeat samples, and
# gather_for_metrics drops them only from gathered per-sample tensors, while the stages reduce
# token-weighted sums here, which needs every sample exactly once.
class EvalShard:
    """This process's share of a validation loader, for metrics every process computes and then
    reduces: process r takes batches r, r + P, r + 2P, ... of the file-order batches, with no
    sample padded in or repeated (accelerate's even batches would count some twice). Batches
    come moved to the device. Every process must evaluate: rank 0 alone, while the others wait
    at a collective, trips the NCCL watchdog on a large val set.

    `blank(batch)`: under FSDP every forward is a collective (each unit gathers its shards), so
    every process must run as many batches as the one with the most; the ones short of it run
    the first batch again, passed through `blank` (the LM stages clear its labels: it then
    counts nothing)."""

    def __init__(self, accelerator: Accelerator, loader, blank=None):
        from torch.utils.data import DataLoader

        from training.fsdp import is_fsdp
        self.device = accelerator.device
        mine, self.real, _ = shard_batches(len(loader.dataset), loader.batch_size, accelerator.process_index,
                                           accelerator.num_processes, even=blank is not None and is_fsdp(accelerator))
        self.blank = blank
        self.loader = DataLoader(loader.dataset, batch_sampler=mine, collate_fn=loader.collate_fn,
                                 num_workers=loader.num_workers, pin_memory=loader.pin_memory)

    def __iter__(self):
        from accelerate.utils import send_to_device
        for i, batch in enumerate(self.loader):
            if i >= self.real:
                batch = self.blank(batch)
            yield send_to_device(batch, self.device)

    def __len__(self):
        return len(self.loader)


# Not transformers' LengthGroupedSampler: it has no set_epoch (its generator's state carries from
# epoch to epoch, so a run resumed at epoch k would see epoch 0's order) and keeps the mega-batch order.
class LengthGroupedSampler(torch.utils.data.Sampler):
    """Shuffled order in which each batch holds samples of similar length (less padding): a
    permutation by (seed, epoch) is cut into mega-batches of `group` batches, each sorted by
    length, cut into batches, and the batches are shuffled. Every sample once per epoch, the
    same order for the same seed and epoch (so a resumed run sees the same batches);
    `set_epoch` is called by the loop through accelerate."""

    def __init__(self, lengths, batch_size: int, seed: int = 0, group: int = 50):
        self.lengths, self.batch_size, self.seed, self.group = list(lengths), batch_size, seed, group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        mega = self.batch_size * self.group
        ordered = []
        for s in range(0, len(perm), mega):
            ordered += sorted(perm[s:s + mega], key=lambda i: -self.lengths[i])
        # Mega-batches are whole batches, so only the last one can be short; it goes last, or
        # the DataLoader's cuts would fall mid-group for every batch after it.
        tail = len(ordered) % self.batch_size
        full = [ordered[s:s + self.batch_size] for s in range(0, len(ordered) - tail, self.batch_size)]
        for b in torch.randperm(len(full), generator=g).tolist():
            yield from full[b]
        yield from ordered[len(ordered) - tail:]


def accumulation_windows(batches, k: int):
    """Group micro-batches into optimizer steps of k (the last may be shorter)."""
    window = []
    for b in batches:
        window.append(b)
        if len(window) == k:
            yield window
            window = []
    if window:
        yield window


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """A DataLoader worker's init: SIGTERM, SIGINT and SIGUSR1 are the trainer's to act on.
    SLURM and the launchers signal the whole process group; a worker that died of it first
    made torch's child-death handler raise `DataLoader worker ... killed by signal` in the
    trainer mid-step, so no preemption checkpoint was written and the run was lost. Ignoring
    them, the workers keep serving batches until the trainer has checkpointed and exits (they
    then stop with it: torch's workers watch their parent)."""
    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def _shut_down_workers_at_exit() -> None:
    """Stop every live DataLoader's workers through their queues while Python can still do it.
    Workers that ignore SIGTERM outlive multiprocessing's exit hook (it terminates daemonic
    children with SIGTERM, then joins them: a hang), and torch's own shutdown is a no-op once
    the interpreter exits. atexit runs this before both, as it is registered after them.
    Found through gc: accelerate creates the iterators, so nothing else holds them for us."""
    import gc
    import warnings

    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter
    with warnings.catch_warnings():  # isinstance on torch's deprecated aliases (reduce_op) warns
        warnings.simplefilter("ignore", FutureWarning)
        live = [obj for obj in gc.get_objects() if isinstance(obj, _MultiProcessingDataLoaderIter)]
    for obj in live:
        obj._shutdown_workers()


_WORKER_EXIT_HOOK = []


def loader_kwargs(num_workers: int) -> dict:
    """DataLoader settings every stage shares: page-locked batches when CUDA is used (the
    host-to-device copy can then run asynchronously), workers kept alive across epochs (no
    re-fork and re-import of the dataset per epoch) that leave stop signals to the trainer."""
    if num_workers > 0 and not _WORKER_EXIT_HOOK:
        import atexit
        from torch.utils.data import dataloader  # noqa: F401  (its exit hook must be registered before ours)
        atexit.register(_shut_down_workers_at_exit)
        _WORKER_EXIT_HOOK.append(True)
    return {"num_workers": num_workers, "pin_memory": torch.cuda.is_available(),
            "persistent_workers": num_workers > 0,
            "worker_init_fn": ignore_stop_signals if num_workers > 0 else None}
