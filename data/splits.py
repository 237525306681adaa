"""Seeded train/test splits of the labelled pixels (METHOD.md section 4).

Pixels are flat indices r * W + c into the (H, W) ground truth; labels 1..K, 0 unlabelled.
"""
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import maximum_filter


@dataclass
class Split:
    """Train and test pixels plus what the split had to change, for the output."""
    train: np.ndarray              # (n_train,) int64 flat indices
    test: np.ndarray               # (n_test,) int64 flat indices
    notes: list = field(default_factory=list)
    margin_removed: int = 0        # labelled pixels in neither set (disjoint split only)

    def as_dict(self):
        return {"train": self.train.tolist(), "test": self.test.tolist(), "notes": self.notes,
                "margin_removed": self.margin_removed}


def class_budget(n_pixels, train_per_class, train_ratio):
    """Training pixels for a class of n_pixels: the budget, at most half the class (>= 1)."""
    want = int(np.ceil(train_ratio * n_pixels)) if train_ratio > 0 else int(train_per_class)
    want = max(want, 1)
    return min(want, max(n_pixels // 2, 1)), want


def random_split(gt, train_per_class=15, seed=0, train_ratio=0.0, class_names=None):
    """The papers' split: per class, `train_per_class` random labelled pixels train, the rest test.

    gt: (H, W) int labels. train_ratio > 0 replaces the per-class count by a fraction.
    A class with fewer than twice the budget gives half of its pixels, noted in `notes`.
    """
    rng = np.random.default_rng(seed)
    flat = gt.ravel()
    train, test, notes = [], [], []
    for label in range(1, int(flat.max()) + 1):
        pixels = np.flatnonzero(flat == label)
        if len(pixels) == 0:
            continue
        take, want = class_budget(len(pixels), train_per_class, train_ratio)
        if take < want:
            notes.append(f"class {_name(label, class_names)}: {len(pixels)} labelled pixels, "
                         f"{take} used for training instead of {want} (half of the class)")
        chosen = rng.permutation(pixels)
        train.append(chosen[:take])
        test.append(chosen[take:])
    return Split(np.sort(np.concatenate(train)).astype(np.int64),
                 np.sort(np.concatenate(test)).astype(np.int64), notes)


def disjoint_split(gt, train_per_class=15, seed=0, patch_size=15, train_ratio=0.0, class_names=None,
                   n_candidates=200):
    """Spatially disjoint split: no test pixel within Chebyshev distance < patch_size of a train pixel.

    Each class's training pixels form one compact cluster: the `take` pixels of the class nearest to
    a seed pixel. The seed is drawn (seeded RNG) among the best quarter of `n_candidates` random
    pixels of the class, scored by how many pixels of the class lie outside the margin of a cluster
    there, so each class keeps as many test pixels as it can. Test pixels are the labelled pixels at
    Chebyshev distance >= patch_size from every training pixel (no test patch overlaps a training
    patch); the labelled pixels in between are counted in `margin_removed`, and classes left with
    no test pixel are reported in `notes`.
    """
    rng = np.random.default_rng(seed)
    h, w = gt.shape
    flat = gt.ravel()
    labels = [c for c in range(1, int(flat.max()) + 1) if np.any(flat == c)]
    train, notes = [], []
    for label in labels:
        pixels = np.flatnonzero(flat == label)
        take, want = class_budget(len(pixels), train_per_class, train_ratio)
        if take < want:
            notes.append(f"class {_name(label, class_names)}: {len(pixels)} labelled pixels, "
                         f"{take} used for training instead of {want} (half of the class)")
        rows, cols = np.divmod(pixels, w)
        reach = patch_size + int(np.ceil(np.sqrt(take)))  # margin plus the cluster's own extent
        candidates = rng.choice(len(pixels), size=min(n_candidates, len(pixels)), replace=False)
        kept = np.array([np.sum(np.maximum(np.abs(rows - rows[i]), np.abs(cols - cols[i])) >= reach)
                         for i in candidates])
        best = candidates[kept >= np.quantile(kept, 0.75)]
        centre = rng.choice(best)
        distance = np.hypot(rows - rows[centre], cols - cols[centre]) + 1e-6 * rng.random(len(pixels))
        train.append(pixels[np.argsort(distance)[:take]])
    train = np.sort(np.concatenate(train)).astype(np.int64)
    train_mask = np.zeros(h * w, dtype=bool)
    train_mask[train] = True
    near_train = maximum_filter(train_mask.reshape(h, w), size=2 * patch_size - 1, mode="constant").ravel()
    labelled = flat > 0
    test = np.flatnonzero(labelled & ~near_train)
    margin_removed = int(np.sum(labelled & near_train & ~train_mask))
    for label in labels:
        if not np.any(flat[test] == label):
            notes.append(f"class {_name(label, class_names)}: no test pixel left outside the margin; "
                         "it is excluded from the test metrics")
    notes.append(f"disjoint split: {margin_removed} labelled pixels within {patch_size - 1} pixels "
                 "of a training pixel are left out of both sets")
    return Split(train, test.astype(np.int64), notes, margin_removed)


def make_split(gt, kind, train_per_class, seed, patch_size, train_ratio=0.0, class_names=None):
    """Dispatch on kind: 'random' or 'disjoint'."""
    if kind == "random":
        return random_split(gt, train_per_class, seed, train_ratio, class_names)
    if kind == "disjoint":
        return disjoint_split(gt, train_per_class, seed, patch_size, train_ratio, class_names)
    raise ValueError(f"unknown split {kind!r}")


def _name(label, class_names):
    return f"{label} ({class_names[label - 1]})" if class_names else str(label)
