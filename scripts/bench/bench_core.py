"""Timing, peak memory and FLOP counting for scripts/benchmark.py.

Timing: the median of `repeats` runs after warm-up. On CUDA each run is bracketed by CUDA
events (torch.cuda.Event) and the peak memory is torch.cuda.max_memory_allocated() after
reset_peak_memory_stats(), so it includes the weights, gradients and optimizer state that are
resident (`relative=True`: only what the call adds). On CPU: wall time, and the peak of the
tensor storage one untimed call allocates and holds at once (`LivePeak`), which leaves out
what existed before the call (weights, optimizer state after the warm-up).

Model FLOPs per training step (the formulas of Kaplan et al. 2020 and of the PaLM paper's
MFU, appendix B), N = parameters, T = tokens, L = layers, d = width, V = vocabulary:

    ViT (or text tower) trained             6*N*T + 12*L*T^2*d   per image (or caption)
    frozen tower, forward only              2*N*T
    frozen LLM with the gradient flowing    4*N*T                (forward + input gradients,
      through it to a trained part below                          no weight gradients)
    trained LLM                             6*N*T
    LM head per supervised token            2*V*d forward; x3 when trained, x2 when frozen
                                            with the gradient flowing through

N of an LLM excludes the embedding table (a lookup) and the head (its own line). The
attention-score term 12*L*T^2*d is counted for trained towers only: a frozen tower's or the
LM's attention scores are left out, so MFU errs low. Recomputation under gradient
checkpointing is not counted (model FLOPs, not hardware FLOPs).

MFU = model FLOPs per second / the device's datasheet dense (non-sparse) bf16 tensor peak
(DEVICE_PEAKS; --peak_tflops overrides), as PaLM and everyone quoting MFU define it. The rate of
a large bf16 GEMM measured in the same run (the `mfu_reference` row) is a second column,
`mfu_vs_gemm`: what share of what this device actually delivers the step uses. It reads higher,
since no GEMM reaches the datasheet number (an H100 SXM sustains roughly 60-80% of it). A CPU
has no peak in the table: its rows say so and carry only the GEMM ratio.
"""
from __future__ import annotations

import re
import statistics
import time

import torch

FLOP_FORMULAS = {
    "vit_trained": "6*N*T + 12*L*T^2*d per image",
    "frozen_tower": "2*N*T",
    "frozen_llm_grad_through": "4*N*T",
    "trained_llm": "6*N*T",
    "lm_head": "2*V*d per supervised token forward; x3 trained, x2 frozen with gradient through",
}
HEAD_FACTOR = {"forward": 1, "grad_through": 2, "trained": 3}

# Dense bf16 tensor-core peaks in TFLOPS (FP32 accumulate), matched against
# torch.cuda.get_device_name() in this order. The datasheets print the 2:4-sparse figure with an
# asterisk ("with sparsity"); the dense one, used here, is half of it.
DEVICE_PEAKS = [
    (r"H100.*PCIe", 756.0, "H100 PCIe, NVIDIA H100 datasheet: 1,513 sparse"),
    (r"H100.*NVL", 835.0, "H100 NVL, NVIDIA H100 datasheet: 1,671 sparse"),
    (r"GH200", 989.4, "GH200's Hopper GPU, NVIDIA GH200 datasheet: 1,979 sparse"),
    (r"H200.*NVL", 835.0, "H200 NVL, NVIDIA H200 datasheet: 1,671 sparse"),
    (r"H200", 989.4, "H200 SXM, NVIDIA H200 datasheet: 1,979 sparse"),
    (r"H100|H800", 989.4, "H100 SXM, NVIDIA H100 datasheet: 1,979 sparse"),
    (r"A100|A800", 312.0, "A100, NVIDIA A100 datasheet: 624 sparse"),
    (r"L40S", 362.05, "L40S, NVIDIA L40S datasheet: 733 sparse"),
    (r"L40\b", 181.05, "L40, NVIDIA L40 datasheet: 362 sparse"),
    (r"\bL4\b", 121.0, "L4, NVIDIA L4 datasheet: 242 sparse"),
    (r"A10G", 125.0, "A10G: NVIDIA publishes no A10G sheet; the A10 datasheet's 250 sparse"),
    (r"\bA10\b", 125.0, "A10, NVIDIA A10 datasheet: 250 sparse"),
    (r"\bA40\b", 149.7, "A40, NVIDIA A40 datasheet: 299.4 sparse"),
    (r"RTX 4090", 165.2, "RTX 4090, NVIDIA Ada Lovelace architecture whitepaper, appendix: 330.4 sparse"),
]


def datasheet_peak(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 TFLOPS, where the number comes from) for a CUDA device name, or None."""
    for pattern, tflops, source in DEVICE_PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return tflops, source
    return None


# ---------------------------------------------------------------- FLOPs

def vit_train_flops(n_params: int, tokens: int, layers: int, width: int) -> int:
    return 6 * n_params * tokens + 12 * layers * tokens ** 2 * width


def frozen_flops(n_params: int, tokens: int) -> int:
    return 2 * n_params * tokens


def grad_through_flops(n_params: int, tokens: int) -> int:
    return 4 * n_params * tokens


def trained_flops(n_params: int, tokens: int) -> int:
    return 6 * n_params * tokens


def lm_head_flops(vocab: int, width: int, tokens: int, mode: str) -> int:
    """mode: forward, grad_through (frozen head, gradient to the hidden states) or trained."""
    return 2 * vocab * width * tokens * HEAD_FACTOR[mode]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tower_shape(model: torch.nn.Module) -> dict:
    """N, T, L, d of a SigLIP vision or text tower (SiglipVisionModel / SiglipTextModel or
    their inner transformer)."""
    c = model.config
    tokens = (c.image_size // c.patch_size) ** 2 if hasattr(c, "image_size") else c.max_position_embeddings
    return {"N": n_params(model), "T": tokens, "L": c.num_hidden_layers, "d": c.hidden_size}


def tower_flops(model: torch.nn.Module, mode: str) -> int:
    """FLOPs per sample of a SigLIP tower: mode `trained` or `frozen` (forward only)."""
    s = tower_shape(model)
    return vit_train_flops(s["N"], s["T"], s["L"], s["d"]) if mode == "trained" else frozen_flops(s["N"], s["T"])


def lm_body_params(language_model: torch.nn.Module) -> int:
    """The decoder's parameters without its input embedding table (the head is counted apart)."""
    emb = language_model.get_input_embeddings()
    return n_params(language_model) - n_params(emb)


# ---------------------------------------------------------------- timing and memory

class LivePeak:
    """Peak bytes of tensor storage allocated inside the block and alive at the same time: the
    CPU counterpart of torch.cuda.max_memory_allocated() (above what existed before). Written
    here because torch keeps no statistics for its CPU allocator, tracemalloc does not see
    torch's allocations, and the process RSS hides what glibc keeps for reuse. Every op runs
    through a TorchDispatchMode (backward included); an output whose storage is not one of the
    op's inputs' is a new allocation, and it is freed when its storage's weak reference expires."""

    def __enter__(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        tracker = self
        self.live, self.now, self.peak = {}, 0, 0

        def storages(tree):
            for t in tree_leaves(tree):
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    yield t.untyped_storage()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {StorageWeakRef(st).cdata for st in storages((args, kwargs))}
                for st in storages(out):
                    ref = StorageWeakRef(st)
                    if ref.cdata not in inputs and ref.cdata not in tracker.live:
                        tracker.collect()
                        tracker.live[ref.cdata] = (ref, st.nbytes())
                        tracker.now += st.nbytes()
                        tracker.peak = max(tracker.peak, tracker.now)
                return out
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def collect(self):
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.now -= size

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def measure(fn, *, device, repeats: int, warmup: int = 1, relative: bool = False) -> dict:
    """{"time_s": median seconds per call, "peak_MiB": see the module docstring}; relative:
    on CUDA too, the peak above what was allocated before the timed runs, and on CPU the
    warm-up call is the one LivePeak watches (for calls whose first run allocates nothing that
    later runs keep, such as a loss: it saves a run)."""
    watch = relative and warmup > 0 and not is_cuda(device)
    for i in range(warmup):
        if watch and i == warmup - 1:
            with LivePeak() as live:
                fn()
        else:
            fn()
    sync(device)
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if relative else 0
        events = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
        peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    else:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        if not watch:
            with LivePeak() as live:  # one more run, untimed: the tracker costs Python time per op
                fn()
        peak = live.peak / 2 ** 20
    return {"time_s": statistics.median(times), "peak_MiB": peak}


def measure_interleaved(fns: dict, *, device, repeats: int, warmup: int = 1) -> dict[str, dict]:
    """measure() of several calls, timed in alternation (A, B, A, B, ...) instead of one after the
    other: on a shared CPU the load drifts over seconds, and back-to-back blocks then compare
    one load against another. Each gets the median of `repeats` runs and its own peak memory."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    out = {}
    for name, fn in fns.items():
        if is_cuda(device):
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            with LivePeak() as live:
                fn()
            peak = live.peak / 2 ** 20
        out[name] = {"time_s": statistics.median(times[name]), "peak_MiB": peak}
    return out


def memory_ratio(a, b) -> float | None:
    """a / b for two peaks in MiB; None where either is missing or under 1 MiB (a ratio of
    near-zero peaks says nothing)."""
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and min(a, b) >= 1 else None


def attempt(fn, device) -> dict:
    """measure(...) or {"error": "out of memory"}: a path that does not fit is a result too."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        free(device)


def free(device) -> None:
    import gc
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def memory_method(device) -> str:
    if is_cuda(device):
        return "torch.cuda.max_memory_allocated after reset_peak_memory_stats (absolute)"
    return "peak of tensor storage allocated in one step and alive at once (LivePeak), above what existed before"


# ---------------------------------------------------------------- the MFU reference

def matmul_rate(device, *, n: int, dtype, repeats: int) -> dict:
    """FLOP/s of an n x n x n matmul in `dtype`: the denominator of every `mfu_vs_gemm`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    m = measure(lambda: a @ b, device=device, repeats=repeats, warmup=2)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "time_s": m["time_s"],
            "flops_per_s": 2 * n ** 3 / m["time_s"]}
