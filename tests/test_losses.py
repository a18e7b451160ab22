import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from losses import siglip_loss, siglip_loss_global, siglip_loss_reference


def _norm(t):
    return F.normalize(t, dim=-1)


def test_siglip_loss_hand_computed_3x3():
    # Orthonormal features make every logit either t+b (match) or b (non-match):
    # L = -(1/3) * [3*log s(t+b) + 6*log s(-b)]  with t = 10, b = -10.
    x = torch.eye(3)
    loss = siglip_loss(x, x, torch.tensor(math.log(10.0)), torch.tensor(-10.0))
    logsig = lambda v: -math.log1p(math.exp(-v))
    expected = -(3 * logsig(0.0) + 6 * logsig(10.0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(math.log(2) + 2 * math.log1p(math.exp(-10)), rel=1e-9)


@pytest.mark.parametrize("chunk", [1, 2, 7, 4096])
@pytest.mark.parametrize("m_extra", [0, 3])
def test_siglip_loss_and_grads_match_naive_autograd(chunk, m_extra):
    torch.manual_seed(0)
    n, m, d = 5, 5 + m_extra, 8
    x0, y0 = torch.randn(n, d, dtype=torch.float64), torch.randn(m, d, dtype=torch.float64)
    s0, b0 = torch.tensor(1.3, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)

    def run(fn):
        x, y, s, b = (t.clone().requires_grad_() for t in (x0, y0, s0, b0))
        loss = fn(_norm(x), _norm(y), s, b)
        loss.backward()
        return loss.detach(), x.grad, y.grad, s.grad, b.grad

    ours = run(lambda *a: siglip_loss(*a, chunk_size=chunk))
    ref = run(siglip_loss_reference)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-5, atol=1e-6)


def test_siglip_loss_is_float32_under_autocast():
    x = _norm(torch.randn(4, 8)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = siglip_loss(x, x, torch.tensor(2.3), torch.tensor(-10.0))
    assert loss.dtype == torch.float32


def test_positive_index_selects_matching_column():
    x = torch.eye(4)[:2]
    y = torch.eye(4)
    # image 0's caption is text 2, image 1's is text 3: each gets one +1 pair.
    loss_shift = siglip_loss(x, y[[2, 3, 0, 1]], torch.tensor(2.3), torch.tensor(-10.0),
                             positive_index=torch.tensor([2, 3]))
    loss_diag = siglip_loss(x, y, torch.tensor(2.3), torch.tensor(-10.0))
    torch.testing.assert_close(loss_shift, loss_diag)


# ------------------------------------------------------------ 2 processes (gloo)

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _towers():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)


def _loss_and_grads(img_tower, txt_tower, imgs, txts, scale, bias, fn):
    loss = fn(_norm(img_tower(imgs)), _norm(txt_tower(txts)), scale, bias)
    loss.backward()
    grads = [p.grad.clone() for p in [*img_tower.parameters(), *txt_tower.parameters(), scale, bias]]
    return loss.detach(), grads


def _worker(rank, ws, port, imgs, txts, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=ws)
    img_tower, txt_tower = _towers()
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    per = imgs.shape[0] // ws
    sl = slice(rank * per, (rank + 1) * per)
    loss, grads = _loss_and_grads(img_tower, txt_tower, imgs[sl], txts[sl], scale, bias, siglip_loss_global)
    # what DDP does with gradients and what the trainer logs: the mean over processes
    for g in grads:
        torch.distributed.all_reduce(g)
        g /= ws
    torch.distributed.all_reduce(loss)
    if rank == 0:
        out.put(((loss / ws).numpy(), [g.numpy() for g in grads]))
    torch.distributed.destroy_process_group()


def test_two_processes_equal_one_process_on_union_batch():
    torch.manual_seed(1)
    imgs, txts = torch.randn(8, 6), torch.randn(8, 5)
    img_tower, txt_tower = _towers()
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    ref_loss, ref_grads = _loss_and_grads(img_tower, txt_tower, imgs, txts, scale, bias, siglip_loss_reference)

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, imgs, txts, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, "a worker process failed (see its traceback above)"
    loss, grads = out.get(timeout=5)
    loss, grads = torch.from_numpy(loss), [torch.from_numpy(g) for g in grads]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # and the local-only loss (no gather) would NOT match: the test can fail
    local = siglip_loss_reference(_norm(img_tower(imgs[:4])), _norm(txt_tower(txts[:4])), scale, bias)
    assert abs(local.item() - ref_loss.item()) > 1e-3
