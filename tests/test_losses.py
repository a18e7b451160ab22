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
    assert loss.item() == pytest.approx(expected, rel=1e-6)  # = log 2 + 2 log(1 + e^-10)


@pytest.mark.parametrize("chunk", [1, 2, 7, 4096, None])
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


# ------------------------------------------------------------ repeated captions

def test_duplicate_captions_hand_computed():
    """3 images, captions [A, A, B]; orthonormal features, t = 10, b = -10. Images 0 and 1 share
    caption A, so both A columns are positives for both: z = [[1,1,-1],[1,1,-1],[-1,-1,1]]."""
    e = torch.eye(3)
    x = e[[0, 1, 2]]
    y = e[[0, 0, 2]]  # both copies of caption A embed to e0
    t, b = 10.0, -10.0
    # logits t*x.y+b: image 0 meets A twice at 10-10=0, image 1 meets A at -10, B at -10, etc.
    logsig = lambda v: -math.log1p(math.exp(-v))  # noqa: E731
    expected = -(2 * logsig(0.0) + logsig(10.0)            # image 0: A, A positive; B negative (-10)
                 + 2 * logsig(-10.0) + logsig(10.0)        # image 1: A, A positive at -10; B negative
                 + 2 * logsig(10.0) + logsig(0.0)) / 3     # image 2: A, A negative at -10; B positive at 0
    labels = torch.tensor([0, 0, 1])
    by_labels = siglip_loss(x, y, torch.tensor(math.log(t)), torch.tensor(b), image_labels=labels, text_labels=labels)
    by_mask = siglip_loss(x, y, torch.tensor(math.log(t)), torch.tensor(b),
                          positive_mask=labels[:, None] == labels[None, :])
    assert by_labels.item() == pytest.approx(expected, rel=1e-6)
    assert by_mask.item() == pytest.approx(expected, rel=1e-6)
    paper = siglip_loss(x, y, torch.tensor(math.log(t)), torch.tensor(b))  # duplicates as negatives
    assert abs(paper.item() - expected) > 1.0


@pytest.mark.parametrize("chunk", [1, 2, 4096])
def test_unique_labels_and_identity_mask_equal_the_paper_loss(chunk):
    torch.manual_seed(3)
    x, y = _norm(torch.randn(6, 8)), _norm(torch.randn(9, 8))  # 3 extra negative texts
    s, b = torch.tensor(1.7), torch.tensor(-4.0)
    ref = siglip_loss(x, y, s, b, chunk_size=chunk)
    lab = siglip_loss(x, y, s, b, image_labels=torch.arange(6), text_labels=torch.arange(9), chunk_size=chunk)
    mask = siglip_loss(x, y, s, b, positive_mask=torch.eye(6, 9, dtype=torch.bool), chunk_size=chunk)
    torch.testing.assert_close(lab, ref)
    torch.testing.assert_close(mask, ref)
    with pytest.raises(ValueError, match="one of"):
        siglip_loss(x, y, s, b, positive_index=torch.arange(6), positive_mask=torch.eye(6, 9, dtype=torch.bool))


@pytest.mark.parametrize("mode,sign", [("positive", 1), ("negative", -1)])
def test_gradient_on_a_duplicate_pair_pulls_it_together(mode, sign):
    """Images 0 and 1 carry the same caption. The gradient step on text row 0 from image 1 moves
    it toward image 1 when duplicates are positives (and away, the old behaviour, when not)."""
    x = torch.eye(3)[:2]                     # image 0 = e0, image 1 = e1
    y = _norm(torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])).requires_grad_()  # caption A twice
    labels = torch.tensor([0, 0])
    pos = dict(image_labels=labels, text_labels=labels) if mode == "positive" else {}
    siglip_loss(x, y, torch.tensor(math.log(10.0)), torch.tensor(-10.0), **pos).backward()
    step = -y.grad[0]                        # gradient descent direction for text row 0
    assert sign * (step @ x[1]).item() > 0


def test_frozen_text_features_get_no_gradient_and_the_image_gradient_is_unchanged():
    torch.manual_seed(4)
    x0, y = torch.randn(5, 8), _norm(torch.randn(5, 8))
    s, b = torch.tensor(2.0), torch.tensor(-5.0)
    xa = x0.clone().requires_grad_()
    siglip_loss(_norm(xa), y, s, b, chunk_size=2).backward()
    xb, yb = x0.clone().requires_grad_(), y.clone().requires_grad_()
    siglip_loss(_norm(xb), yb, s, b, chunk_size=2).backward()
    assert y.grad is None
    torch.testing.assert_close(xa.grad, xb.grad)


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


def _worker(rank, ws, port, imgs, txts, out, labels=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=ws)
    img_tower, txt_tower = _towers()
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    per = imgs.shape[0] // ws
    sl = slice(rank * per, (rank + 1) * per)
    fn = siglip_loss_global if labels is None else (lambda *a: siglip_loss_global(*a, labels=labels[sl]))
    loss, grads = _loss_and_grads(img_tower, txt_tower, imgs[sl], txts[sl], scale, bias, fn)
    # what DDP does with gradients and what the trainer logs: the mean over processes
    for g in grads:
        torch.distributed.all_reduce(g)
        g /= ws
    torch.distributed.all_reduce(loss)
    if rank == 0:
        out.put(((loss / ws).numpy(), [g.numpy() for g in grads]))
    torch.distributed.destroy_process_group()


def _dense_reference(x, y, scale, bias, z):
    """The SigLIP loss written out from an explicit z matrix (+1 positive, -1 negative)."""
    logits = scale.exp() * x @ y.T + bias
    return -F.logsigmoid(z * logits).sum() / x.shape[0]


@pytest.mark.parametrize("duplicates", [False, True])
def test_two_processes_equal_one_process_on_union_batch(duplicates):
    """With duplicates, caption 7 sits on both ranks (rows 1, 2 | 5) and caption 3 on rank 0
    only: every copy on either rank must be a positive for every image that carries it."""
    torch.manual_seed(1)
    imgs, txts = torch.randn(8, 6), torch.randn(8, 5)
    labels = torch.tensor([0, 7, 7, 3, 4, 7, 6, 3]) if duplicates else None
    if duplicates:
        txts[[2, 5]] = txts[1].clone()  # the same caption has the same text input
        txts[7] = txts[3].clone()
    img_tower, txt_tower = _towers()
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    if duplicates:
        z = (labels[:, None] == labels[None, :]).float() * 2 - 1
        ref_fn = lambda x, y, s, b: _dense_reference(x, y, s, b, z)  # noqa: E731
    else:
        ref_fn = siglip_loss_reference
    ref_loss, ref_grads = _loss_and_grads(img_tower, txt_tower, imgs, txts, scale, bias, ref_fn)

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, imgs, txts, out, labels)) for r in range(2)]
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


def test_default_chunk_keeps_the_chunk_matrix_small_and_covers_every_column():
    """The default width keeps [n, chunk] near 4M logits at any n (at least 256 wide), and a
    text count that is not a multiple of it (301 texts in chunks of 256) gives the full-matrix
    loss and gradients."""
    from losses import default_chunk
    assert default_chunk(1024) == 4096 and default_chunk(8192) == 512 and default_chunk(65536) == 256
    torch.manual_seed(0)
    x0, y0 = _norm(torch.randn(300, 16)), _norm(torch.randn(301, 16))
    s0, b0 = torch.tensor(2.0), torch.tensor(-5.0)
    grads = []
    for fn in (lambda *a: siglip_loss(*a, chunk_size=default_chunk(20000)), siglip_loss_reference):
        x, y, s, b = (t.clone().requires_grad_() for t in (x0, y0, s0, b0))
        loss = fn(x, y, s, b)
        loss.backward()
        grads.append((loss.detach(), x.grad, y.grad, s.grad, b.grad))
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)
