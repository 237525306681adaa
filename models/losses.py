"""Contrastive losses of PCL and NSMM (METHOD.md sections 1 and 2).

Ordering convention shared by every function here: the 2N embeddings of a
batch are [view 1 of samples 0..N-1, view 2 of samples 0..N-1], so row r's
positive is column (r + N) mod 2N.
"""
import torch
import torch.nn.functional as F

from utils.device import host_to_device


def positive_index(n, device=None):
    """Column of each anchor's positive: (2N,) long, r -> (r + N) mod 2N."""
    return (torch.arange(2 * n, device=device) + n) % (2 * n)


def pcl_weights(spectra, a=0.75, b=0.25):
    """PCL negative weights from superpixel mean spectra.

    spectra: (N, B) float, the mean spectrum of each anchor's superpixel.
    Returns w: (N, N), w_ij = a ** ((m_ij - mu_j) / b) where m_ij = (c_ij + 1) / 2,
    c_ij the Pearson correlation of spectra i and j, and mu_j the column mean of m.
    """
    centred = spectra - spectra.mean(dim=1, keepdim=True)      # (N, B)
    unit = F.normalize(centred, dim=1, eps=1e-12)               # (N, B)
    corr = (unit @ unit.T).clamp(-1.0, 1.0)                     # (N, N)
    similarity = (corr + 1.0) / 2.0                             # (N, N) in [0, 1]
    column_mean = similarity.mean(dim=0, keepdim=True)          # (1, N)
    return torch.pow(torch.as_tensor(a, dtype=spectra.dtype, device=spectra.device),
                     (similarity - column_mean) / b)


def tile_weights(w):
    """(N, N) sample weights -> (2N, 2N) for the two views."""
    return w.repeat(2, 2)


def similarity_logits(z1, z2, temperature=0.5):
    """Cosine similarities over temperature of the 2N embeddings: (2N, 2N)."""
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)          # (2N, D)
    return z @ z.T / temperature


def weighted_nt_xent(z1, z2, weights=None, temperature=0.5, anchors=None):
    """NT-Xent with per-negative weights in the denominator (computed in log space).

    z1, z2: (N, D) embeddings of the two views (normalised here).
    weights: None or (2N, 2N), rows anchors, columns candidates; multiplies each
        negative term exp(s_rk / t). The diagonal and each anchor's positive are
        ignored (the positive keeps weight 1). A zero weight removes that negative.
    anchors: None (all 2N rows) or (M,) long row indices: the loss is the mean over
        those anchors only, each still against all 2N candidates (a DDP rank passes the
        rows of its own samples in both views; the mean over all ranks is the full loss).
    Returns the mean loss over the anchors (a scalar tensor).
    """
    n = z1.shape[0]
    if anchors is None:
        logits = similarity_logits(z1, z2, temperature)          # (2N, 2N)
        rows = torch.arange(2 * n, device=logits.device)
    else:
        z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)      # (2N, D)
        rows = anchors.to(z.device)
        logits = z[rows] @ z.T / temperature                    # (M, 2N)
    local = torch.arange(len(rows), device=logits.device)       # row of `logits` per anchor
    pos = positive_index(n, logits.device)[rows]                 # (M,) column of each positive
    if weights is not None:
        weights = weights.to(logits.dtype)[rows]                 # (M, 2N), a copy
        weights[local, pos] = 1.0
        logits_denominator = logits + torch.log(weights)        # log 0 = -inf: exact exclusion
    else:
        logits_denominator = logits
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[local, rows] = True
    logits_denominator = logits_denominator.masked_fill(self_mask, float("-inf"))
    log_denominator = torch.logsumexp(logits_denominator, dim=1)  # (M,)
    return (log_denominator - logits[local, pos]).mean()


def nsmm_mask(pseudolabels, sim, n_hard, n_easy, generator=None):
    """NSMM negative mask: drop same-pseudolabel negatives, keep hard + easy ones.

    pseudolabels: (N,) int, one per sample.
    sim: (2N, 2N) current embedding similarities, ordered as in weighted_nt_xent.
    For each anchor row r the candidates are the columns that are neither r nor
    r's positive and whose sample's pseudolabel differs from r's. The n_hard
    candidates with largest sim[r, k] are kept, plus n_easy drawn uniformly (from
    `generator`) among the other candidates; with fewer than n_hard + n_easy
    candidates all are kept. Returns a (2N, 2N) float 0/1 mask with 1 at r and
    at r's positive.
    """
    n = pseudolabels.shape[0]
    device = sim.device
    labels2 = pseudolabels.to(device).repeat(2)                  # (2N,)
    rows = torch.arange(2 * n, device=device)
    pos = positive_index(n, device)
    candidate = labels2[:, None] != labels2[None, :]            # (2N, 2N)
    candidate[rows, rows] = False
    candidate[rows, pos] = False
    neg_inf = torch.finfo(sim.dtype).min
    # Hard: the n_hard most similar candidates of each row.
    hard_score = sim.detach().masked_fill(~candidate, neg_inf)
    keep = torch.zeros_like(candidate)
    k_hard = min(n_hard, 2 * n)
    if k_hard > 0:
        top = hard_score.topk(k_hard, dim=1).indices             # (2N, k_hard)
        keep.scatter_(1, top, True)
        keep &= candidate
    # Easy: n_easy uniform among the remaining candidates (random keys, top-k).
    remaining = candidate & ~keep
    k_easy = min(n_easy, 2 * n)
    if k_easy > 0:
        keys = host_to_device(torch.rand(sim.shape, generator=generator, device="cpu"), device)
        keys = keys.masked_fill(~remaining, -1.0)
        pick = keys.topk(k_easy, dim=1).indices
        chosen = torch.zeros_like(candidate).scatter_(1, pick, True)
        keep |= chosen & remaining
    keep[rows, rows] = True
    keep[rows, pos] = True
    return keep.to(sim.dtype)


def false_negative_share(logits, weights, labels):
    """Share of the denominator's negative mass that falls on true-class negatives.

    logits: (2N, 2N) similarities over temperature; weights: None or (2N, 2N);
    labels: (N,) ground-truth class per sample, 0 = unlabelled (ignored).
    Over anchors r and negatives k that are both labelled, returns
    sum_{y_k = y_r} W_rk exp(s_rk) / sum_k W_rk exp(s_rk), a 0-dim tensor in [0, 1] on
    logits' device (nan if no labelled pair: 0 / 0), left there so that a GPU step need not
    wait for it. A diagnostic only: never used for training.
    """
    n = labels.shape[0]
    device = logits.device
    labels2 = labels.to(device).repeat(2)
    rows = torch.arange(2 * n, device=device)
    negative = torch.ones_like(logits, dtype=torch.bool)
    negative[rows, rows] = False
    negative[rows, positive_index(n, device)] = False
    labelled = (labels2[:, None] > 0) & (labels2[None, :] > 0)
    mass = torch.exp(logits - logits.max().detach())
    if weights is not None:
        mass = mass * weights.to(mass.dtype)
    mass = mass * (negative & labelled)
    same = labels2[:, None] == labels2[None, :]
    return (mass * same).sum() / mass.sum()
