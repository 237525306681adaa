"""Which negatives count, and how much: the four `negatives=` modes of pretraining.

all       plain SimCLR: every negative with weight 1 (weights None)
pcl       PCL superpixel weights (METHOD.md section 1)
nsmm      pseudolabel elimination + hard/easy mixture (METHOD.md section 2)
pcl+nsmm  the PCL weight times the NSMM mask
"""
import torch

from models.losses import nsmm_mask, pcl_weights, similarity_logits, tile_weights

MODES = ("all", "pcl", "nsmm", "pcl+nsmm")


def negative_weights(mode, spectra, pseudolabels, z1, z2, temperature, a=0.75, b=0.25,
                     n_hard=64, n_easy=64, generator=None):
    """The (2N, 2N) weight matrix for one branch's loss, or None for plain NT-Xent.

    spectra: (N, B) superpixel mean spectra of the anchors; pseudolabels: (N,) int;
    z1, z2: (N, D) this branch's embeddings (only read, detached, for hard-negative mining).
    """
    if mode == "all":
        return None
    weights = tile_weights(pcl_weights(spectra, a, b)) if "pcl" in mode else None
    if "nsmm" in mode:
        with torch.no_grad():
            sim = similarity_logits(z1.detach().float(), z2.detach().float(), temperature)
        mask = nsmm_mask(pseudolabels, sim, n_hard, n_easy, generator)
        weights = mask if weights is None else weights * mask
    return weights
