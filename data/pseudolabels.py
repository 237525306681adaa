"""NSMM pseudolabels: k-means over superpixel mean spectra (METHOD.md section 2).

Ground-truth labels are never read here; `purity` compares against them afterwards.
"""
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from utils.fileio import atomic_path


def superpixel_pseudolabels(spectra, k, n_components=30, seed=0):
    """Cluster superpixels by their mean spectra.

    spectra: (S, B) float. PCA to min(n_components, S, B) components, then k-means
    (k clusters, 10 restarts, seeded). Returns (S,) int64 cluster ids 0..k-1.
    """
    n_segments = spectra.shape[0]
    k = max(1, min(k, n_segments))
    components = min(n_components, n_segments, spectra.shape[1])
    reduced = PCA(n_components=components, random_state=seed).fit_transform(spectra.astype(np.float64))
    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(reduced)
    return kmeans.labels_.astype(np.int64)


def pixel_pseudolabels(superpixels, cluster_of_superpixel):
    """Each pixel takes its superpixel's cluster: (H, W) int64."""
    return cluster_of_superpixel[superpixels]


def purity(pseudolabels, gt):
    """Share of labelled pixels whose cluster's majority class is their own class.

    pseudolabels, gt: (H, W) int; gt 0 = unlabelled (ignored). Returns a float in [0, 1].
    """
    labelled = gt > 0
    clusters, classes = pseudolabels[labelled], gt[labelled]
    if clusters.size == 0:
        return float("nan")
    table = np.zeros((clusters.max() + 1, classes.max() + 1), dtype=np.int64)
    np.add.at(table, (clusters, classes), 1)
    return float(table.max(axis=1).sum() / clusters.size)


def cached_superpixel_pseudolabels(spectra, k, n_components, seed, cache_dir, key):
    """superpixel_pseudolabels, cached as <cache_dir>/pseudo_<key>_k<k>_pca<n>_s<seed>.npy.

    key: identifies the superpixels (e.g. the SLIC cache file's stem). Returns ((S,) int64, hit).
    """
    path = Path(cache_dir) / f"pseudo_{key}_k{k}_pca{n_components}_s{seed}.npy"
    if path.exists():
        try:
            clusters = np.load(path)
            if clusters.shape == (spectra.shape[0],):
                return clusters.astype(np.int64), True
        except (OSError, ValueError):
            pass  # a damaged cache entry is recomputed
    clusters = superpixel_pseudolabels(spectra, k, n_components, seed)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, clusters)
    return clusters, False
