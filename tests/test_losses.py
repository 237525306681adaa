"""Losses against closed forms and independent re-computations (METHOD.md 1-2)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.losses import (false_negative_share, nsmm_mask, pcl_weights, similarity_logits, tile_weights,
                           weighted_nt_xent)


def textbook_nt_xent(z1, z2, t):
    """Loop-by-loop SimCLR NT-Xent in float64, as written in the paper."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1).numpy()
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for r in range(n2):
        p = (r + n) % n2
        num = math.exp(z[r] @ z[p] / t)
        den = sum(math.exp(z[r] @ z[k] / t) for k in range(n2) if k != r)
        total += -math.log(num / den)
    return total / n2


def test_nt_xent_matches_textbook():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    got = weighted_nt_xent(z1.double(), z2.double(), temperature=0.5).item()
    assert got == pytest.approx(textbook_nt_xent(z1, z2, 0.5), rel=1e-10)


def test_identical_embeddings_give_log_2n_minus_1():
    z = torch.ones(8, 4)
    assert weighted_nt_xent(z, z).item() == pytest.approx(math.log(2 * 8 - 1), rel=1e-6)


def test_all_ones_weights_equal_none():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    a = weighted_nt_xent(z1, z2, torch.ones(10, 10), temperature=0.2)
    b = weighted_nt_xent(z1, z2, None, temperature=0.2)
    assert torch.allclose(a, b, atol=1e-6)


def test_zero_weight_removes_exactly_that_negative():
    g = torch.Generator().manual_seed(2)
    n, t = 4, 0.5
    z1, z2 = torch.randn(n, 3, generator=g).double(), torch.randn(n, 3, generator=g).double()
    w = torch.ones(2 * n, 2 * n, dtype=torch.float64)
    w[0, 1] = 0.0
    got = weighted_nt_xent(z1, z2, w, t).item()
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    s = (z @ z.T / t).numpy()
    losses = []
    for r in range(2 * n):
        p = (r + n) % (2 * n)
        ks = [k for k in range(2 * n) if k != r and not (r == 0 and k == 1)]
        losses.append(-s[r, p] + math.log(sum(math.exp(s[r, k]) for k in ks)))
    assert got == pytest.approx(np.mean(losses), rel=1e-10)


def test_weights_on_diagonal_and_positive_are_ignored():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    w = torch.ones(6, 6)
    w.fill_diagonal_(0.0)
    w[torch.arange(6), (torch.arange(6) + 3) % 6] = 7.0
    assert torch.allclose(weighted_nt_xent(z1, z2, w), weighted_nt_xent(z1, z2), atol=1e-6)


def test_weighted_loss_symmetric_in_views():
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    w = tile_weights(torch.rand(5, 5, generator=g) + 0.1)
    assert torch.allclose(weighted_nt_xent(z1, z2, w), weighted_nt_xent(z2, z1, w), atol=1e-6)


def test_pcl_weights_hand_computed():
    spectra = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 2.0, 4.0]], dtype=torch.float64)
    # Pearson correlations by hand: r(0,1) = -1, r(0,2) = 3/sqrt(3*(7/3)*... ) computed with numpy.
    x = spectra.numpy()
    c = np.corrcoef(x)
    m = (c + 1) / 2
    mu = m.mean(axis=0)
    expected = 0.75 ** ((m - mu[None, :]) / 0.25)
    got = pcl_weights(spectra).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # spot value: m[0,1] = 0 (anti-correlated); mu_1 = (0 + 1 + m[2,1]) / 3
    m21 = (np.corrcoef(x[2], x[1])[0, 1] + 1) / 2
    assert got[0, 1] == pytest.approx(0.75 ** ((0 - (1 + m21) / 3) / 0.25))


def test_pcl_weights_range_and_direction():
    g = torch.Generator().manual_seed(5)
    w = pcl_weights(torch.rand(32, 50, generator=g))
    assert w.min() >= 0.75 ** 4 - 1e-6 and w.max() <= 0.75 ** -4 + 1e-6
    base = torch.linspace(0, 1, 20)
    spectra = torch.stack([base, base + 0.01 * torch.randn(20, generator=g), base.flip(0)])
    w = pcl_weights(spectra)
    assert w[0, 1] < w[0, 2]  # a similar superpixel counts less as a negative


def test_nsmm_mask_eliminates_same_pseudolabel_and_keeps_positive():
    labels = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.randn(10, 10, generator=torch.Generator().manual_seed(0))
    mask = nsmm_mask(labels, sim, n_hard=100, n_easy=0)
    lab2 = labels.repeat(2)
    for r in range(10):
        for k in range(10):
            if k == r or k == (r + 5) % 10:
                assert mask[r, k] == 1
            else:
                assert mask[r, k] == float(lab2[r] != lab2[k])


def test_nsmm_mask_keeps_exactly_hard_plus_easy():
    n = 12
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(n)  # every other sample is a candidate
    sim = torch.randn(2 * n, 2 * n, generator=g)
    mask = nsmm_mask(labels, sim, n_hard=3, n_easy=4, generator=torch.Generator().manual_seed(7))
    rows = torch.arange(2 * n)
    pos = (rows + n) % (2 * n)
    for r in range(2 * n):
        cand = [k for k in range(2 * n) if k != r and k != pos[r]]
        kept = [k for k in cand if mask[r, k] == 1]
        assert len(kept) == 7
        hardest = sorted(cand, key=lambda k: -sim[r, k].item())[:3]
        assert set(hardest) <= set(kept)
    again = nsmm_mask(labels, sim, 3, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(mask, again)
    other = nsmm_mask(labels, sim, 3, 4, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(mask, other)


def test_nsmm_mask_few_candidates_keeps_all():
    labels = torch.tensor([0, 1, 1])
    sim = torch.zeros(6, 6)
    mask = nsmm_mask(labels, sim, n_hard=5, n_easy=5)
    # Anchor 0 (label 0): candidates are samples 1, 2 in both views.
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 1]
    # Anchor 1 (label 1): only sample 0 is a candidate.
    assert mask[1].tolist() == [1, 1, 0, 1, 1, 0]


def test_pcl_times_nsmm_is_the_product_in_the_loss():
    g = torch.Generator().manual_seed(9)
    n = 6
    z1, z2 = torch.randn(n, 4, generator=g).double(), torch.randn(n, 4, generator=g).double()
    w = tile_weights(pcl_weights(torch.rand(n, 10, generator=g).double()))
    mask = nsmm_mask(torch.tensor([0, 0, 1, 1, 2, 2]), torch.randn(2 * n, 2 * n, generator=g).double(), 2, 1,
                     generator=torch.Generator().manual_seed(0))
    combined = weighted_nt_xent(z1, z2, w * mask)
    # Equivalent: drop masked negatives from the sum, weight the others by w.
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    s = (z @ z.T / 0.5).numpy()
    ww, mm = w.numpy(), mask.numpy()
    total = 0.0
    for r in range(2 * n):
        p = (r + n) % (2 * n)
        den = math.exp(s[r, p]) + sum(ww[r, k] * math.exp(s[r, k]) for k in range(2 * n)
                                      if k not in (r, p) and mm[r, k] == 1)
        total += -s[r, p] + math.log(den)
    assert combined.item() == pytest.approx(total / (2 * n), rel=1e-10)


def test_false_negative_share_zero_when_pseudolabels_are_truth():
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([1, 1, 2, 2, 3, 3, 1, 0])
    n = labels.shape[0]
    z1, z2 = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / 0.5
    mask = nsmm_mask(labels, logits, n_hard=100, n_easy=100)
    assert false_negative_share(logits, mask, labels) == 0.0
    assert false_negative_share(logits, None, labels) > 0.0


def test_loss_decreases_with_training():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    net = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    w = tile_weights(pcl_weights(torch.rand(16, 12, generator=g)))
    losses = []
    for _ in range(30):
        noise1, noise2 = 0.1 * torch.randn(16, 8, generator=g), 0.1 * torch.randn(16, 8, generator=g)
        loss = weighted_nt_xent(net(x + noise1), net(x + noise2), w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_anchor_subsets_average_to_the_full_loss_and_gradient():
    # DDP: each of W ranks averages over its samples' rows in both views; the mean of
    # the W rank losses is the full loss, and so is the mean of their gradients
    g = torch.Generator().manual_seed(11)
    n, world = 6, 3
    z1 = torch.randn(n, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = tile_weights(torch.rand(n, n, generator=g, dtype=torch.float64) + 0.1)
    w[0, 3] = 0.0
    full = weighted_nt_xent(z1, z2, w, 0.3)
    full_grad = torch.autograd.grad(full, (z1, z2))
    per = n // world
    parts = []
    for rank in range(world):
        mine = torch.arange(rank * per, (rank + 1) * per)
        parts.append(weighted_nt_xent(z1, z2, w, 0.3, anchors=torch.cat([mine, mine + n])))
    mean = torch.stack(parts).mean()
    assert mean.item() == pytest.approx(full.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(mean, (z1, z2)), full_grad):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    every = weighted_nt_xent(z1, z2, w, 0.3, anchors=torch.arange(2 * n))
    assert every.item() == pytest.approx(full.item(), rel=1e-12)
    one = weighted_nt_xent(z1, z2, None, 0.3, anchors=torch.tensor([4]))
    zz = F.normalize(torch.cat([z1, z2]), dim=1).detach()
    s = (zz @ zz.T / 0.3).numpy()
    expected = -s[4, 4 + n] + math.log(sum(math.exp(s[4, k]) for k in range(2 * n) if k != 4))
    assert one.item() == pytest.approx(expected, rel=1e-12)


def test_negative_weights_modes():
    from models.negatives import batch_pcl_weights, negative_weights
    g = torch.Generator().manual_seed(0)
    n = 6
    spectra = torch.rand(n, 10, generator=g)
    pseudo = torch.tensor([0, 0, 1, 1, 2, 2])
    z1, z2 = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    sim = similarity_logits(z1, z2, 0.5)
    assert batch_pcl_weights("all", spectra) is None and batch_pcl_weights("nsmm", spectra) is None
    pcl = batch_pcl_weights("pcl", spectra)
    torch.testing.assert_close(pcl, pcl_weights(spectra).repeat(2, 2))
    assert negative_weights("all", None, pseudo, sim) is None
    assert negative_weights("pcl", pcl, pseudo, sim) is pcl
    mask = negative_weights("nsmm", None, pseudo, sim, n_hard=2, n_easy=0)
    torch.testing.assert_close(mask, nsmm_mask(pseudo, sim, 2, 0))
    assert 0 < mask.sum() < mask.numel()
    both = negative_weights("pcl+nsmm", batch_pcl_weights("pcl+nsmm", spectra), pseudo, sim, n_hard=2, n_easy=0)
    torch.testing.assert_close(both, pcl * mask)
