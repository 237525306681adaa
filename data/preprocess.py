"""Per-band standardisation, computed once per scene and shared by both scripts."""
import numpy as np


def standardise(cube):
    """Standardise each band to zero mean, unit variance over all pixels.

    cube: (H, W, B) any numeric dtype. Returns (H, W, B) float32.
    A constant band (std 0) is centred and left unscaled.
    """
    flat = cube.reshape(-1, cube.shape[-1]).astype(np.float64)
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)
    std[std == 0] = 1.0
    return ((cube - mean) / std).astype(np.float32)
