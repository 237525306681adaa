"""Which negatives count, and how much: the four `negatives=` modes of pretraining.

all       plain SimCLR: every negative with weight 1 (weights None)
pcl       PCL superpixel weights (METHOD.md section 1)
nsmm      pseudolabel elimination + hard/easy mixture (METHOD.md section 2)
pcl+nsmm  the PCL weight times the NSMM mask
"""
from models.losses import nsmm_mask, pcl_weights, tile_weights

MODES = ("all", "pcl", "nsmm", "pcl+nsmm")


def batch_pcl_weights(mode, spectra, a=0.75, b=0.25):
    """The (2N, 2N) PCL weights of a batch when `mode` uses them, else None.

    spectra: (N, B) superpixel mean spectra of the anchors. They depend on the batch only,
    so one step computes them once for both branches.
    """
    return tile_weights(pcl_weights(spectra, a, b)) if "pcl" in mode else None


def negative_weights(mode, pcl, pseudolabels, sim, n_hard=64, n_easy=64, generator=None):
    """The (2N, 2N) weight matrix for one branch's loss, or None for plain NT-Xent.

    pcl: batch_pcl_weights(mode, ...); pseudolabels: (N,) int; sim: (2N, 2N) this branch's
    detached similarity logits (similarity_logits), read for NSMM's hard-negative mining.
    """
    if "nsmm" not in mode:
        return pcl
    mask = nsmm_mask(pseudolabels, sim, n_hard, n_easy, generator)
    return mask if pcl is None else pcl * mask
