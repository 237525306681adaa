"""A small seeded synthetic hyperspectral scene, to try the pipeline on "your own" files.

    python -m utils.make_synthetic_scene --out=datasets/toy

writes datasets/toy/toy_cube.npy ((H, W, B) float32), toy_gt.npy ((H, W) uint8,
0 = unlabelled, 1..K) and toy_class_names.json (a JSON list of K names): the three
files `--dataset=custom --cube=... --gt=... --class_names=...` expects.

The scene: K fields in a jittered grid of rectangles (some left unlabelled, like the
background of real scenes), each with a smooth class spectrum (a sum of Gaussian
absorption/reflectance bumps over a sloped baseline), a per-pixel brightness factor
(illumination), a little within-field spectral drift, and Gaussian noise.
Options (--name=value): out, height, width, bands, classes, noise, seed, prefix.
"""
import json
from pathlib import Path

import numpy as np

from utils.fileio import atomic_path, write_text

CLASS_NAMES = ["water", "bare soil", "grass", "trees", "crop A", "crop B", "asphalt", "roof",
               "wetland", "sand", "shrub", "gravel"]


def class_spectra(n_classes, bands, rng):
    """(K, B) smooth, distinct, positive reflectance curves."""
    x = np.linspace(0.0, 1.0, bands)
    curves = []
    for _ in range(n_classes):
        curve = 0.2 + 0.3 * rng.uniform(-0.5, 0.5) * x           # sloped baseline
        for _ in range(3):                                       # bumps and dips
            centre, width, height = rng.uniform(0, 1), rng.uniform(0.05, 0.25), rng.uniform(-0.15, 0.3)
            curve = curve + height * np.exp(-0.5 * ((x - centre) / width) ** 2)
        curves.append(np.clip(curve, 0.02, None))
    return np.stack(curves).astype(np.float64)


def _edges(size, parts, rng):
    """parts + 1 increasing cut positions 0..size, evenly spaced then jittered by up to a quarter part."""
    edges = np.linspace(0, size, parts + 1)
    edges[1:-1] += rng.uniform(-0.25, 0.25, parts - 1) * size / parts
    return edges.round().astype(int)


def make_scene(height=64, width=64, bands=32, n_classes=5, noise=0.02, seed=0):
    """Return (cube (H, W, B) float32, gt (H, W) uint8 with 0 = unlabelled, class names)."""
    if n_classes < 1 or n_classes > len(CLASS_NAMES):
        raise ValueError(f"n_classes must be in 1..{len(CLASS_NAMES)}")
    rng = np.random.default_rng(seed)
    # fields: a grid of rectangles with jittered edges, each given a class (every class appears)
    rows = cols = int(np.ceil(np.sqrt(n_classes + 1)))
    r_edges, c_edges = _edges(height, rows, rng), _edges(width, cols, rng)
    n_fields = rows * cols
    field_class = np.r_[np.arange(1, n_classes + 1), rng.integers(0, n_classes + 1, n_fields - n_classes)]
    field_class = rng.permutation(field_class)
    field = np.zeros((height, width), dtype=np.int64)
    for i in range(rows):
        for j in range(cols):
            field[r_edges[i]:r_edges[i + 1], c_edges[j]:c_edges[j + 1]] = i * cols + j
    # unlabelled fields take a spectrum of their own (background), not one of a class
    spectra = class_spectra(n_classes + 1, bands, rng)                   # row 0 = background
    drift = 0.03 * rng.standard_normal((n_fields, bands)).cumsum(1) / np.sqrt(bands)
    labels = field_class[field]                                          # (H, W) 0..K
    cube = spectra[labels] + drift[field]                                # (H, W, B)
    cube *= rng.uniform(0.85, 1.15, (height, width, 1))                  # illumination
    cube += noise * rng.standard_normal(cube.shape)
    gt = labels.astype(np.uint8)
    # a 1-pixel unlabelled border between fields, as annotators leave around edges
    edge = np.zeros_like(gt, dtype=bool)
    edge[1:, :] |= field[1:, :] != field[:-1, :]
    edge[:, 1:] |= field[:, 1:] != field[:, :-1]
    gt[edge] = 0
    return (1000 * cube).astype(np.float32), gt, CLASS_NAMES[:n_classes]


def write_scene(out, prefix="toy", **kwargs):
    """Write <out>/<prefix>_cube.npy, _gt.npy and _class_names.json; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cube, gt, names = make_scene(**kwargs)
    paths = (out / f"{prefix}_cube.npy", out / f"{prefix}_gt.npy", out / f"{prefix}_class_names.json")
    for path, array in zip(paths, (cube, gt)):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    write_text(paths[2], json.dumps(names) + "\n")
    return paths


def main(argv):
    from utils.config import resolve_config
    config = resolve_config({"out": "datasets/toy", "prefix": "toy", "height": 64, "width": 64, "bands": 32,
                             "classes": 5, "noise": 0.02, "seed": 0}, argv)
    if min(config["height"], config["width"]) < 4 or config["bands"] < 1:
        from utils.errors import UserError
        raise UserError("--height and --width must be >= 4 and --bands >= 1")
    try:
        paths = write_scene(config["out"], config["prefix"], height=config["height"], width=config["width"],
                            bands=config["bands"], n_classes=config["classes"], noise=config["noise"],
                            seed=config["seed"])
    except ValueError as err:
        from utils.errors import UserError
        raise UserError(f"--classes={config['classes']}: {err}") from None
    gt = np.load(paths[1])
    print(f"wrote {paths[0]} ({config['height']} x {config['width']} x {config['bands']}), {paths[1]} "
          f"({int((gt > 0).sum())} labelled pixels, {config['classes']} classes), {paths[2]}")


if __name__ == "__main__":
    from utils.errors import run_main
    run_main(main)
