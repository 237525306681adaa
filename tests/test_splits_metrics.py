"""Splits (random and spatially disjoint), metrics, superpixels, patches."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from scipy.ndimage import distance_transform_cdt
from sklearn.metrics import accuracy_score, cohen_kappa_score, recall_score

from data.patches import PatchCutter, random_views
from data.splits import disjoint_split, random_split
from data.superpixels import cached_superpixels, slic_params, superpixel_mean_spectra
from utils.metrics import classification_scores

DATA = os.environ.get("HSI_DATA_DIR", "")


def real_gt(name, key):
    path = Path(DATA) / name
    if not DATA or not path.exists():
        pytest.skip(f"HSI_DATA_DIR does not hold {name}")
    return scipy.io.loadmat(path)[key].astype(np.int64)


def test_random_split_counts_disjoint_and_seeded():
    gt = real_gt("Indian_pines_gt.mat", "indian_pines_gt")
    split = random_split(gt, train_per_class=15, seed=3)
    flat = gt.ravel()
    assert len(np.intersect1d(split.train, split.test)) == 0
    assert len(split.train) + len(split.test) == int((flat > 0).sum())
    for c in range(1, 17):
        n_c = int((flat == c).sum())
        expected = 15 if n_c >= 30 else n_c // 2
        assert int((flat[split.train] == c).sum()) == expected
    # Grass-pasture-mowed (28 pixels) and Oats (20) give half their pixels, and say so; no other class.
    assert [n.split(":")[0] for n in split.notes] == ["class 7", "class 9"]
    again = random_split(gt, train_per_class=15, seed=3)
    assert np.array_equal(split.train, again.train) and np.array_equal(split.test, again.test)
    other = random_split(gt, train_per_class=15, seed=4)
    assert not np.array_equal(split.train, other.train)


def test_random_split_ratio():
    gt = real_gt("Indian_pines_gt.mat", "indian_pines_gt")
    split = random_split(gt, train_ratio=0.1, seed=0)
    flat = gt.ravel()
    assert int((flat[split.train] == 2).sum()) == int(np.ceil(0.1 * 1428))


@pytest.mark.parametrize("patch_size,per_class", [(15, 15), (9, 5)])
def test_disjoint_split_no_test_pixel_near_a_train_pixel(patch_size, per_class):
    gt = real_gt("Indian_pines_gt.mat", "indian_pines_gt")
    split = disjoint_split(gt, train_per_class=per_class, seed=0, patch_size=patch_size)
    h, w = gt.shape
    train_mask = np.zeros(h * w, bool)
    train_mask[split.train] = True
    # Chebyshev distance from every pixel to the nearest training pixel.
    dist = distance_transform_cdt(~train_mask.reshape(h, w), metric="chessboard").ravel()
    assert dist[split.test].min() >= patch_size
    assert len(np.intersect1d(split.train, split.test)) == 0
    flat = gt.ravel()
    assert np.all(flat[split.test] > 0) and np.all(flat[split.train] > 0)
    for c in range(1, 17):
        assert (flat[split.train] == c).sum() >= 1
        if (flat[split.test] == c).sum() == 0:
            assert any("no test pixel" in n and re.match(rf"class {c}[ :]", n) for n in split.notes)
    assert split.margin_removed == int((flat > 0).sum()) - len(split.train) - len(split.test)
    assert len(split.test) > 0.3 * (flat > 0).sum()


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(1, 6, size=500)
    p = np.where(rng.random(500) < 0.7, y, rng.integers(1, 6, size=500))
    s = classification_scores(y, p, 5)
    assert s["oa"] == pytest.approx(accuracy_score(y, p))
    assert s["aa"] == pytest.approx(recall_score(y, p, average="macro"))
    assert s["kappa"] == pytest.approx(cohen_kappa_score(y, p))
    assert s["per_class_accuracy"] == pytest.approx(list(recall_score(y, p, average=None)))
    assert np.array(s["confusion"]).sum() == 500


def test_metrics_class_absent_from_test_is_left_out_of_aa():
    y = np.array([1, 1, 2, 2])
    p = np.array([1, 2, 2, 2])
    s = classification_scores(y, p, 3)
    assert s["per_class_accuracy"][2] is None
    assert s["aa"] == pytest.approx(0.75)


def test_slic_labels_and_cache(tmp_path):
    rng = np.random.default_rng(0)
    cube = rng.normal(size=(40, 30, 12)).astype(np.float32)
    cube[:20] += 3.0
    params = slic_params(cube.shape)
    labels, path, hit = cached_superpixels(cube, params, tmp_path, "toy")
    assert labels.shape == (40, 30) and labels.dtype == np.int64
    assert labels.min() == 0 and set(np.unique(labels)) == set(range(labels.max() + 1))
    assert not hit and path.exists()
    again, path2, hit2 = cached_superpixels(cube, params, tmp_path, "toy")
    assert hit2 and path2 == path and np.array_equal(again, labels)
    other, path3, hit3 = cached_superpixels(cube + 1.0, params, tmp_path, "toy")
    assert not hit3 and path3 != path
    spectra = superpixel_mean_spectra(cube, labels)
    s0 = labels == 0
    np.testing.assert_allclose(spectra[0], cube[s0].mean(0), rtol=1e-5, atol=1e-5)


def test_patch_cutter_matches_numpy_padding():
    rng = np.random.default_rng(0)
    cube = rng.normal(size=(9, 11, 4)).astype(np.float32)
    cutter = PatchCutter(cube, 5)
    padded = np.pad(cube, ((2, 2), (2, 2), (0, 0)), mode="reflect")
    idx = torch.tensor([0, 10, 50, 98])
    got = cutter(idx).numpy()
    for k, p in enumerate(idx.tolist()):
        r, c = divmod(p, 11)
        np.testing.assert_array_equal(got[k], padded[r:r + 5, c:c + 5].transpose(2, 0, 1))
        np.testing.assert_array_equal(got[k, :, 2, 2], cube[r, c])


def test_views_seeded_and_identity_without_augmentation():
    x = torch.randn(6, 4, 7, 7)
    v1 = random_views(x, torch.Generator().manual_seed(0))
    v2 = random_views(x, torch.Generator().manual_seed(0))
    assert torch.equal(v1, v2) and v1.shape == x.shape
    same = random_views(x, torch.Generator().manual_seed(0), crop_min=1.0, jitter_p=0.0)
    assert torch.allclose(same, x, atol=1e-5)


def test_result_json_is_strict(tmp_path):
    import json
    from utils.fileio import write_json
    path = tmp_path / "r.json"
    write_json(path, {"kappa": float("nan"), "runs": [{"oa": 0.5, "x": [float("inf"), 1.0]}]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"kappa": None, "runs": [{"oa": 0.5, "x": [None, 1.0]}]}


def test_summary_over_seeds_skips_unscored_classes_without_warnings():
    """Class 2 has no test pixel under seed 1's split, class 3 under no split: the mean and std
    of class 2 are over the seeds that scored it, class 3's are NaN (null in the JSON), and
    no RuntimeWarning reaches the user's terminal (np.nanmean used to print 'Mean of empty slice')."""
    import warnings

    from finetune import summarise

    runs = [{"scores": {"oa": 0.9, "aa": 0.8, "kappa": 0.7, "per_class_accuracy": [1.0, 0.5, None]}},
            {"scores": {"oa": 0.7, "aa": 0.6, "kappa": 0.5, "per_class_accuracy": [0.5, None, None]}}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = summarise(runs, 3)
    assert summary["oa"] == pytest.approx({"mean": 0.8, "std": 0.1})
    mean, std = summary["per_class_accuracy"]["mean"], summary["per_class_accuracy"]["std"]
    assert mean[:2] == pytest.approx([0.75, 0.5]) and std[:2] == pytest.approx([0.25, 0.0])
    assert np.isnan(mean[2]) and np.isnan(std[2])
