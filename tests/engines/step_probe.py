"""Run by tests/test_optimizer_step.py under each engine (one process, DDP, FSDP2 on CPU):
a toy model trained through the shared OptimizerStep, with an inf gradient planted in one
window, writing what happened to OUTPUT_DIR/probe_rank{R}.json after every window.
tests/test_reliability_loop.py also plants a NaN in one process's reported loss only (its
gradients stay finite) and a preemption signal that reaches one process only."""
import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from accelerator_setup import setup_accelerator_and_logging
from cli import add_common_args
from training.data import accumulation_windows
from training.step import OptimizerStep


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class Toy(torch.nn.Module):
    _no_split_modules = ["Block"]

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x).squeeze(-1)


def main():
    p = add_common_args(argparse.ArgumentParser())
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--bad_window", type=int, default=1)
    p.add_argument("--nan_loss_window", type=int, default=-1,
                   help="process 0 reports a NaN loss for this window; its gradients stay finite")
    p.add_argument("--signal_window", type=int, default=-1, help="process --signal_rank gets SIGUSR1 in this window")
    p.add_argument("--signal_rank", type=int, default=0)
    p.add_argument("--cpu_grad_scaler", action="store_true",
                   help="fp16 loss scaling as on a GPU, with torch.amp.GradScaler('cpu')")
    args = p.parse_args()
    acc = setup_accelerator_and_logging(args)
    if args.cpu_grad_scaler:  # accelerate only builds a scaler for fp16 on an accelerator
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        acc.native_amp = True
    torch.manual_seed(0)
    model = Toy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    updates = []
    opt.register_step_post_hook(lambda *a: updates.append(1))
    model, opt = acc.prepare(model, opt)
    stepper = OptimizerStep(acc, opt, model, [q for q in model.parameters() if q.requires_grad], args.max_grad_norm,
                            patience=args.max_nonfinite_steps)
    stepper.catch_preemption()
    k = args.gradient_accumulation_steps
    g = torch.Generator().manual_seed(1 + acc.process_index)
    micro = [(torch.randn(4, 8, generator=g), torch.randn(4, generator=g)) for _ in range(args.windows * k)]
    norms, applied = [], []
    for w, window in enumerate(accumulation_windows(micro, k)):
        reported = 0.0
        for x, y in stepper.micro_batches(window):
            loss = ((model(x) - y) ** 2).mean() / len(window)
            if w == args.bad_window and acc.is_main_process:
                loss = loss * float("inf")  # one process's loss: the all-reduce spreads it
            stepper.backward(loss)
            reported += loss.detach()
        if w == args.nan_loss_window and acc.is_main_process:
            reported = reported * float("nan")  # only the flag all-reduce tells the other process
        if w == args.signal_window and acc.process_index == args.signal_rank:
            os.kill(os.getpid(), signal.SIGUSR1)
        norm, ok = stepper.finish(w, reported, window)
        norms.append(float(norm))
        applied.append(bool(ok))
        flat = torch.cat([q.detach().float().full_tensor().reshape(-1) if hasattr(q, "full_tensor")
                          else q.detach().float().reshape(-1) for q in model.parameters()])
        out = {"updates": len(updates), "applied": applied, "grad_norms": norms, "steps_taken": stepper.steps_taken,
               "finite": bool(torch.isfinite(flat).all()), "weights": flat.tolist(),
               "scale": acc.scaler.get_scale() if acc.scaler is not None else None,
               "engine": str(acc.distributed_type), "nonfinite_skipped": stepper.guard.total}
        Path(args.output_dir, f"probe_rank{acc.process_index}.json").write_text(json.dumps(out))
        stepper.stop_if_requested(w + 1, {"epoch": 0, "batches_done": (w + 1) * k}, args)
    stepper.close()
    acc.wait_for_everyone()
    acc.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
