"""The label-aware losses of the dermatology recipe (seed 004), each against a hand-computed value."""
import math

import pytest
import torch
import torch.nn.functional as F

from losses import (LabelAwareObjective, hard_negative_weights, icd_dissimilarity, icd_geometry_loss, jaccard_targets,
                    label_overlap, ramp_coefficients, sigmoid_pair_loss, siglip_loss, wasserstein_loss)

T, B = torch.tensor(math.log(10.0)), torch.tensor(-10.0)


def logsig(v):
    return -math.log1p(math.exp(-v))


def test_multi_positive_with_unique_labels_is_the_siglip_loss():
    torch.manual_seed(0)
    x, y = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    labels = [{f"c{i}"} for i in range(6)]
    target = label_overlap(labels, labels)
    assert torch.equal(target, torch.eye(6))
    torch.testing.assert_close(sigmoid_pair_loss(x, y, T, B, target), siglip_loss(x, y, T, B))


def test_multi_positive_with_shared_labels_differs_and_pulls_same_label_pairs_together():
    x = torch.eye(3)[:2]
    y = F.normalize(torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]), dim=-1).requires_grad_()
    labels = [{"psoriasis"}, {"psoriasis"}]
    target = label_overlap(labels, labels)
    assert target.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    loss = sigmoid_pair_loss(x, y, T, B, target)
    assert abs(loss.item() - siglip_loss(x, y.detach(), T, B).item()) > 1
    loss.backward()
    assert (-y.grad[0] @ x[1]).item() > 0  # text 0 moves toward image 1, which shares its label


def test_soft_targets_for_multi_label_rows_hand_computed():
    # image 0 has {a, b}, text 0 {a, b}, text 1 {a}: targets 1 and 1/2 (Jaccard); orthonormal
    # features put every logit at b = -10 except the matched pair at t + b = 0.
    x, y = torch.eye(2), torch.eye(2)
    target = label_overlap([{"a", "b"}, {"a"}], [{"a", "b"}, {"a"}])
    assert target.tolist() == [[1.0, 0.5], [0.5, 1.0]]
    loss = sigmoid_pair_loss(x, y, T, B, target)
    per_image = -(logsig(0.0) + 0.5 * logsig(-10.0) + 0.5 * logsig(10.0))
    assert loss.item() == pytest.approx(per_image, rel=1e-6)  # mean of two identical rows


def test_weighted_sigmoid_hand_computed():
    x = y = torch.eye(3)
    loss = sigmoid_pair_loss(x, y, T, B, torch.eye(3), pos_weight=5.0)
    assert loss.item() == pytest.approx(-(5 * logsig(0.0) + 2 * logsig(10.0)), rel=1e-6)


def test_hard_negative_weights():
    x = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    target = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # rows 0, 1 share a label
    w = hard_negative_weights(x, x, target, beta=5.0)
    assert torch.all(w[target > 0] == 0)  # same-label pairs are never negatives
    assert w[0, 2] == pytest.approx(1.0) and w[2, :2].mean() == pytest.approx(1.0)  # mean 1 per image
    y = F.normalize(torch.tensor([[1.0, 0.1], [0.2, 1.0], [0.0, 1.0]]), dim=-1)
    w2 = hard_negative_weights(x[:1], y, torch.tensor([[1.0, 0.0, 0.0]]), beta=5.0)
    assert w2[0, 1] > w2[0, 2] and w2[0, 1:].mean() == pytest.approx(1.0)  # the harder negative weighs more
    # equal similarities: every weight 1, the plain loss
    eq = hard_negative_weights(torch.eye(3), torch.eye(3), torch.eye(3))
    torch.testing.assert_close(sigmoid_pair_loss(torch.eye(3), torch.eye(3), T, B, torch.eye(3), neg_weight=eq),
                               siglip_loss(torch.eye(3), torch.eye(3), T, B))


def test_icd_dissimilarity_follows_the_who_tree():
    codes = ["L40.0", "L40.1", "L20.9", "C43.9"]
    d = icd_dissimilarity(codes)
    assert torch.equal(d, d.T) and torch.all(d.diagonal() == 0)
    assert d[0, 1] < d[0, 2] < d[0, 3]  # same category < same chapter (XII) < other chapter (II)
    # L40.0 and L40.1 meet at L40: one step each; L40.0 to C43.9 goes through the root:
    # 4 steps up (L40, L40-L45, XII, root) and 6 down (II, C00-C97, C00-C75, C43-C44, C43, C43.9)
    assert d[0, 1].item() == pytest.approx(2 / 10) and d[0, 3].item() == pytest.approx(1.0)


def test_icd_10_cm_codes_hang_under_their_who_category():
    # L82.1 (seborrhoeic keratosis, other) and R91.1 (solitary pulmonary nodule) are ICD-10-CM
    # subcategories that WHO's tree lacks; each sits one step below its WHO category, so it keeps
    # the category's block and chapter: L82.1 meets L57.0 at chapter XII (3 steps up, 3 down).
    d = icd_dissimilarity(["L82.1", "L82", "L57.0", "C43.9", "R91.1", "R90.0"]) * 10  # the largest path: 10
    assert d[0, 1].item() == pytest.approx(1) and d[0, 2].item() == pytest.approx(d[1, 2].item() + 1) == pytest.approx(6)
    assert d[0, 3].item() == pytest.approx(10)  # through the root: 4 up, 6 down
    assert d[4, 5].item() == pytest.approx(4)  # block R90-R94: R91.1 > R91 > block < R90 < R90.0


def test_icd_geometry_loss_hand_computed():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # distance (1 - cos)/2 = 0.5
    assert icd_geometry_loss(e, torch.tensor([[0.0, 0.5], [0.5, 0.0]])).item() == pytest.approx(0.0)
    assert icd_geometry_loss(e, torch.tensor([[0.0, 0.1], [0.1, 0.0]])).item() == pytest.approx(0.16)


def test_wasserstein_zero_for_identical_and_known_for_a_shift():
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    assert wasserstein_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    pts = torch.arange(7.0).reshape(-1, 1)
    assert wasserstein_loss(pts, pts + 3.0).item() == pytest.approx(3.0, rel=1e-5)  # 1-D: exactly the shift
    y = x.clone().requires_grad_()
    wasserstein_loss(x + 1.0, y).backward()
    assert y.grad.abs().sum() > 0  # differentiable


def test_ramp_schedule():
    steps = (0, 1000, 2000, 2500)
    assert ramp_coefficients(0, steps, 0.5, 0.2, 0.1) == (0.0, 0.0, 0.0)
    assert ramp_coefficients(500, steps, 0.5, 0.2, 0.1) == pytest.approx((0.25, 0.0, 0.0))
    assert ramp_coefficients(1500, steps, 0.5, 0.2, 0.1) == pytest.approx((0.5, 0.1, 0.0))
    assert ramp_coefficients(2250, steps, 0.5, 0.2, 0.1) == pytest.approx((0.5, 0.2, 0.05))
    assert ramp_coefficients(9000, steps, 0.5, 0.2, 0.1) == pytest.approx((0.5, 0.2, 0.1))
    assert ramp_coefficients(9000, steps, 1.0, 0.2, 0.1)[0] == 0.9  # the contrastive term keeps a floor


# images and texts with the label sets {a, b}, {a}, {c}: rows 0 and 1 share a label, not a set
SETS = [{"a", "b"}, {"a"}, {"c"}]
HOT = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def test_hard_mode_overlap_is_any_shared_label_at_both_call_sites():
    hard = label_overlap(SETS, SETS, soft=False)
    assert hard.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert torch.equal(jaccard_targets(HOT, HOT, soft=False), hard)  # the objective's call site
    assert torch.equal(jaccard_targets(HOT, HOT, soft=True), label_overlap(SETS, SETS))


def test_a_shared_label_is_never_a_hard_negative():
    # image 0 is closest to text 1, which shares its label a: the hardest pair if it were a negative
    x = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    y = F.normalize(torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.01, 0.0], [0.1, 0.0, 1.0]]), dim=-1)
    target = label_overlap(SETS, SETS, soft=False)
    w = hard_negative_weights(x, y, target, beta=5.0)
    assert w[0, 1] == 0 and w[1, 0] == 0
    objective = LabelAwareObjective(["sigmoid", "hard_negative"], gamma=1.0, ramp_steps=(0, 0, 0, 0))
    _, terms = objective(x, y, T, B, HOT, step=5)
    torch.testing.assert_close(terms["loss/hard_negative"], sigmoid_pair_loss(x, y, T, B, target, neg_weight=w))
    torch.testing.assert_close(terms["loss/sigmoid"], sigmoid_pair_loss(x, y, T, B, target))


def _clouds(seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(16, 8, generator=g), dim=-1), F.normalize(torch.randn(16, 8, generator=g), dim=-1)


def test_wasserstein_projections_follow_the_training_step():
    x, y = _clouds()
    objective = LabelAwareObjective(["sigmoid", "wasserstein"], beta=0.5, ramp_steps=(0, 0, 0, 0))
    hot = torch.eye(16)

    def at(step):
        return objective(x, y, T, B, hot, step)[1]["loss/wasserstein"]
    assert at(5).item() != at(6).item()  # fresh projections every step
    assert torch.equal(at(5), at(5))  # and the same ones again when a resumed run replays step 5
    assert wasserstein_loss(x, y, seed=1).item() != wasserstein_loss(x, y, seed=2).item()


def test_wasserstein_is_pots_on_projections_drawn_on_the_cpu(monkeypatch):
    # POT seeds its torch backend's CPU and CUDA generators with the same int, and they draw
    # different numbers (Mersenne Twister vs Philox), so an int seed gave other projections on
    # a GPU; a RandomState seed raises with torch tensors. The projections are drawn here instead.
    import ot
    real = ot.sliced_wasserstein_distance
    calls = []
    monkeypatch.setattr(ot, "sliced_wasserstein_distance", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    x, y = _clouds()
    value = wasserstein_loss(x, y, n_projections=32, seed=7)
    (kw,) = calls
    assert "seed" not in kw  # POT draws nothing itself
    proj = kw["projections"]
    assert proj.shape == (8, 32) and proj.device.type == "cpu"
    torch.testing.assert_close(proj.norm(dim=0), torch.ones(32))  # unit directions in feature space
    torch.testing.assert_close(value, real(x, y, projections=proj))  # POT's distance on those directions
    wasserstein_loss(x, y, n_projections=32, seed=7)
    wasserstein_loss(x, y, n_projections=32, seed=8)
    assert torch.equal(calls[1]["projections"], proj) and not torch.equal(calls[2]["projections"], proj)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_wasserstein_projections_are_the_same_on_the_gpu():
    x, y = _clouds()
    torch.testing.assert_close(wasserstein_loss(x.cuda(), y.cuda(), seed=3).cpu(), wasserstein_loss(x, y, seed=3),
                               rtol=1e-4, atol=1e-6)
