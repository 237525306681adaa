"""SLIC superpixels over the standardised cube, cached on disk (METHOD.md section 1)."""
import hashlib
import json
from pathlib import Path

import numpy as np
from skimage.segmentation import slic

from utils.fileio import atomic_path


def slic_params(shape, pixels_per_segment=200, compactness=1.0, sigma=1.0, max_iter=20):
    """SLIC settings of the original work; n_segments = H * W / pixels_per_segment."""
    h, w = shape[:2]
    return {"n_segments": max(1, (h * w) // pixels_per_segment), "compactness": float(compactness),
            "sigma": float(sigma), "max_num_iter": int(max_iter)}


def compute_superpixels(cube, params):
    """SLIC labels of a standardised cube.

    cube: (H, W, B) float32. Returns (H, W) int64 labels 0..S-1 (connectivity enforced,
    no Lab conversion, labels relabelled to be contiguous).
    """
    labels = slic(cube.astype(np.float64), n_segments=params["n_segments"],
                  compactness=params["compactness"], sigma=params["sigma"],
                  max_num_iter=params["max_num_iter"], enforce_connectivity=True,
                  convert2lab=False, start_label=0, channel_axis=-1)
    _, contiguous = np.unique(labels, return_inverse=True)
    return contiguous.reshape(labels.shape).astype(np.int64)


def cube_fingerprint(cube):
    """Short hash of a cube's bytes and shape: the cache key follows the data itself."""
    digest = hashlib.sha1(np.ascontiguousarray(cube).view(np.uint8).ravel()).hexdigest()
    return f"{cube.shape}-{digest[:16]}"


def cached_superpixels(cube, params, cache_dir, scene_name):
    """SLIC labels from `cache_dir`, computed and saved atomically on a miss.

    Returns (labels (H, W) int64, cache path, hit: bool).
    """
    key = hashlib.sha1(json.dumps({"scene": scene_name, "cube": cube_fingerprint(cube), **params},
                                  sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"slic_{scene_name}_{key}.npz"
    if path.exists():
        try:
            with np.load(path) as f:
                labels = f["labels"]
            if labels.shape == cube.shape[:2]:
                return labels.astype(np.int64), path, True
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is recomputed
    labels = compute_superpixels(cube, params)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, labels=labels)
    return labels, path, False


def superpixel_mean_spectra(cube, labels):
    """Mean spectrum of each superpixel.

    cube: (H, W, B) float; labels: (H, W) int 0..S-1. Returns (S, B) float32.
    """
    flat = cube.reshape(-1, cube.shape[-1]).astype(np.float64)
    ids = labels.ravel()
    n_segments = int(ids.max()) + 1
    counts = np.bincount(ids, minlength=n_segments).astype(np.float64)
    sums = np.stack([np.bincount(ids, weights=flat[:, b], minlength=n_segments)
                     for b in range(flat.shape[1])], axis=1)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
