"""Loading real and synthetic scenes, file formats, layouts and every refused input."""
import dataclasses
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from data import SCENES, load_scene, resolve_data_dir
from data.loading import _split_spec, ensure_file, load_array
from data.scenes import palette
from utils.errors import UserError


@pytest.fixture
def real_dir():
    """The folder of real scene files, from $HSI_DATA_DIR."""
    folder = os.environ.get("HSI_DATA_DIR", "")
    if not folder or not Path(folder).is_dir():
        pytest.skip("HSI_DATA_DIR is not set to the folder of real scene files (e.g. /work/shared/data)")
    return Path(folder)


def _save_mat(path, **arrays):
    scipy.io.savemat(path, arrays)
    return path


def _custom(tmp_path, cube, gt, **kw):
    cube_path = _save_mat(tmp_path / "cube.mat", cube=cube)
    gt_path = _save_mat(tmp_path / "gt.mat", gt=gt)
    return load_scene("custom", cube=str(cube_path), gt=str(gt_path), layout="HWB", **kw)


def _good_gt(h=6, w=7, k=3):
    return (np.arange(h * w).reshape(h, w) % (k + 1)).astype(np.uint8)


# ----------------------------------------------------------------------------- real scenes


def test_salinas_a(real_dir):
    scene = load_scene("SalinasA", data_dir=str(real_dir), download=False)
    assert scene.cube.shape == (83, 86, 204) and scene.cube.dtype == np.float32
    assert scene.gt.dtype == np.int64 and scene.shape == (83, 86) and scene.n_bands == 204
    assert scene.n_classes == 6 and scene.label_values == (1, 10, 11, 12, 13, 14)
    assert np.bincount(scene.gt.ravel()).tolist() == [1790, 391, 1343, 616, 1525, 674, 799]
    assert (scene.gt > 0).sum() == 5348
    assert scene.class_names[1] == "Corn_senesced_green_weeds"
    assert scene.palette.shape == (7, 3) and scene.palette.dtype == np.uint8
    raw = scipy.io.loadmat(real_dir / "SalinasA_corrected.mat")["salinasA_corrected"]
    np.testing.assert_array_equal(scene.cube, raw.astype(np.float32))  # raw values, not standardised


def test_indian_subset(real_dir):
    scene = load_scene("IndianPinesSubset", data_dir=str(real_dir), download=False)
    assert scene.cube.shape == (70, 70, 200) and scene.n_classes == 4
    assert np.bincount(scene.gt.ravel())[1:].tolist() == [1005, 358, 732, 1474]
    assert scene.class_names == ["Corn-notill", "Grass-trees", "Soybean-notill", "Soybean-mintill"]


def _expected_subset_gt(real_dir):
    full = scipy.io.loadmat(real_dir / "Indian_pines_gt.mat")["indian_pines_gt"][30:100, 25:95]
    lut = np.zeros(17, dtype=np.int64)
    lut[[2, 6, 10, 11]] = [1, 2, 3, 4]
    return lut[full]


def test_indian_subset_is_the_crop_of_indian_pines_gt(real_dir):
    scene = load_scene("IndianPinesSubset", data_dir=str(real_dir), download=False)
    np.testing.assert_array_equal(scene.gt, _expected_subset_gt(real_dir))


def test_indian_subset_cut_from_full_scene_when_file_absent(real_dir, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    full = rng.integers(900, 9000, size=(145, 145, 200), dtype=np.uint16)
    cube_path = _save_mat(tmp_path / "Indian_pines_corrected.mat", indian_pines_corrected=full)
    shutil.copy(real_dir / "Indian_pines_gt.mat", tmp_path / "Indian_pines_gt.mat")  # tmp only
    info = SCENES["IndianPines"]
    monkeypatch.setitem(SCENES, "IndianPines", dataclasses.replace(
        info, cube=dataclasses.replace(info.cube, size=cube_path.stat().st_size)))
    scene = load_scene("IndianPinesSubset", data_dir=str(tmp_path), download=False)
    assert scene.files["cube"] == tmp_path / "Indian_pines_corrected.mat"
    np.testing.assert_array_equal(scene.cube, full[30:100, 25:95].astype(np.float32))
    np.testing.assert_array_equal(scene.gt, _expected_subset_gt(real_dir))


def test_known_file_with_wrong_size_is_refused(tmp_path):
    (tmp_path / "SalinasA_gt.mat").write_bytes(b"x" * 10)
    with pytest.raises(UserError, match="SalinasA_gt.mat has 10 bytes, expected 587"):
        ensure_file(SCENES["SalinasA"], "gt", tmp_path, download=False)


def test_gt_value_outside_known_classes(real_dir, tmp_path, monkeypatch):
    shutil.copy(real_dir / "SalinasA_corrected.mat", tmp_path)
    gt = scipy.io.loadmat(real_dir / "SalinasA_gt.mat")["salinasA_gt"].copy()
    gt[0, :5] = 5  # 5 is a Salinas class but not one of Salinas-A's
    gt_path = _save_mat(tmp_path / "SalinasA_gt.mat", salinasA_gt=gt)
    info = SCENES["SalinasA"]
    monkeypatch.setitem(SCENES, "SalinasA", dataclasses.replace(
        info, gt=dataclasses.replace(info.gt, size=gt_path.stat().st_size)))
    with pytest.raises(UserError, match=r"SalinasA_gt\.mat.*\[5\]"):
        load_scene("SalinasA", data_dir=str(tmp_path), download=False)


# ----------------------------------------------------------------------------- formats and layouts


def test_v73_mat_equals_v5(tmp_path):
    rng = np.random.default_rng(1)
    cube = rng.integers(0, 1000, size=(9, 11, 5)).astype(np.int16)
    v5 = _save_mat(tmp_path / "v5.mat", cube=cube)
    v73 = tmp_path / "v73.mat"
    with h5py.File(v73, "w", userblock_size=512) as f:  # MATLAB writes a 512-byte header block
        ds = f.create_dataset("cube", data=cube.T)  # column-major: axes reversed on disk
        ds.attrs["MATLAB_class"] = np.bytes_("int16")
    a, b = load_array(v5, layout="HWB"), load_array(v73, layout="HWB")
    assert b.shape == (9, 11, 5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(load_array(v73, "cube", layout="HWB"), cube)


def test_npy_npz_and_layouts(tmp_path):
    rng = np.random.default_rng(2)
    cube = rng.random((40, 50, 8)).astype(np.float32)
    np.save(tmp_path / "c.npy", cube)
    np.testing.assert_array_equal(load_array(tmp_path / "c.npy"), cube)  # auto: 8 bands last
    np.save(tmp_path / "bhw.npy", cube.transpose(2, 0, 1))
    np.testing.assert_array_equal(load_array(tmp_path / "bhw.npy"), cube)  # auto: 8 bands first
    np.testing.assert_array_equal(load_array(tmp_path / "bhw.npy", layout="BHW"), cube)
    np.savez(tmp_path / "z.npz", cube=cube, gt=np.zeros((40, 50), np.uint8))
    np.testing.assert_array_equal(load_array(tmp_path / "z.npz"), cube)
    assert load_array(tmp_path / "z.npz", expect_ndim=2).shape == (40, 50)


def test_ambiguous_layout_asks_for_layout(tmp_path):
    np.save(tmp_path / "cube.npy", np.zeros((30, 30, 30), np.float32))
    with pytest.raises(UserError, match=r"cube\.npy.*--layout=HWB.*--layout=BHW"):
        load_array(tmp_path / "cube.npy")
    assert load_array(tmp_path / "cube.npy", layout="BHW").shape == (30, 30, 30)


def test_key_choice_errors(tmp_path):
    path = _save_mat(tmp_path / "two.mat", a=np.zeros((4, 5, 2)), b=np.ones((4, 5, 2)), g=np.zeros((4, 5)))
    with pytest.raises(UserError, match=r"two\.mat.*several 3-D arrays.*'a'.*'b'"):
        load_array(path, layout="HWB")
    with pytest.raises(UserError, match=r"two\.mat.*no array named 'c'.*'a'.*'b'.*'g'"):
        load_array(path, "c", layout="HWB")
    assert load_array(path, "b", layout="HWB").sum() == 40
    assert load_array(path, expect_ndim=2).shape == (4, 5)


def test_spec_split(tmp_path):
    folder = tmp_path / "a:b"
    folder.mkdir()
    (folder / "x.mat").write_bytes(b"")
    assert _split_spec(str(folder / "x.mat")) == (folder / "x.mat", None)
    assert _split_spec(str(folder / "x.mat") + ":cube") == (folder / "x.mat", "cube")
    assert _split_spec("d/y.mat:") == (Path("d/y.mat"), None)


def test_custom_scene_remaps_labels_and_reads_class_names(tmp_path):
    gt = np.array([[0, 7, 7], [3, 3, 9], [9, 0, 0]], np.int32)
    cube = np.arange(9 * 4, dtype=np.float64).reshape(3, 3, 4)
    (tmp_path / "names.json").write_text(json.dumps(["three", "seven", "nine"]))
    scene = _custom(tmp_path, cube, gt, class_names=str(tmp_path / "names.json"))
    assert scene.label_values == (3, 7, 9) and scene.class_names == ["three", "seven", "nine"]
    np.testing.assert_array_equal(scene.gt, [[0, 2, 2], [1, 1, 3], [3, 0, 0]])
    assert scene.cube.dtype == np.float32 and scene.rgb_bands == (3, 2, 1)
    assert _custom(tmp_path, cube, gt).class_names == ["class 1", "class 2", "class 3"]
    (tmp_path / "names.json").write_text(json.dumps(["only one"]))
    with pytest.raises(UserError, match="names.json"):
        _custom(tmp_path, cube, gt, class_names=str(tmp_path / "names.json"))


def test_resolve_data_dir(monkeypatch):
    monkeypatch.setenv("HSI_DATA_DIR", "/from/env")
    assert resolve_data_dir("given") == Path("given")
    assert resolve_data_dir("") == Path("/from/env")
    monkeypatch.delenv("HSI_DATA_DIR")
    assert resolve_data_dir("") == Path("datasets")


def test_palette_is_fixed_and_distinct():
    p = palette(30)
    assert p.shape == (31, 3) and p.dtype == np.uint8 and p[0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in p}) == 31
    np.testing.assert_array_equal(palette(5), p[:6])


# ----------------------------------------------------------------------------- refused inputs


@pytest.mark.parametrize("case, cube, gt, pattern", [
    ("size mismatch", np.zeros((5, 7, 3)), _good_gt(6, 7), r"cube\.mat is 5 x 7 .*gt\.mat is 6 x 7"),
    ("nan", np.where(np.eye(6, 7)[:, :, None] > 0, np.nan, 1.0) * np.ones((6, 7, 3)), _good_gt(),
     r"cube\.mat: cube has 18 NaN"),
    ("inf", np.full((6, 7, 3), np.inf), _good_gt(), r"cube\.mat: cube has 126 NaN or infinite"),
    ("negative", np.zeros((6, 7, 3)), _good_gt().astype(np.int16) - 1, r"gt\.mat: ground truth has negative"),
    ("fraction", np.zeros((6, 7, 3)), _good_gt() + 0.5, r"gt\.mat: ground truth has 42 non-integer"),
    ("nan gt", np.zeros((6, 7, 3)), np.full((6, 7), np.nan), r"gt\.mat: ground truth has 42 non-integer"),
    ("single pixel", np.zeros((6, 7, 3)), np.where(np.eye(6, 7) * np.arange(6)[:, None] == 5, 9, _good_gt()),
     r"gt\.mat: class 4 \('class 4'\).* 1 labelled pixel"),
    ("unlabelled", np.zeros((6, 7, 3)), np.zeros((6, 7)), r"gt\.mat: no labelled pixels"),
    ("cube 2-D", np.zeros((6, 7)), _good_gt(), r"cube\.mat: no 3-D numeric array"),
    ("gt 3-D", np.zeros((6, 7, 3)), np.zeros((6, 7, 2)), r"gt\.mat: no 2-D numeric array"),
])
def test_bad_custom_inputs(tmp_path, case, cube, gt, pattern):
    with pytest.raises(UserError, match=pattern):
        _custom(tmp_path, cube, gt)


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "text.mat").write_text("this is not a MATLAB file\n" * 20)
    good = _save_mat(tmp_path / "good.mat", cube=np.ones((5, 6, 3)))
    (tmp_path / "cut.mat").write_bytes(good.read_bytes()[:200])
    (tmp_path / "cut.npy").write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<f8', 'fortran_order': False, ")
    for name in ("text.mat", "cut.mat", "cut.npy", "missing.mat"):
        with pytest.raises(UserError, match=name.replace(".", r"\.")):
            load_array(tmp_path / name, layout="HWB")
    (tmp_path / "x.tif").write_bytes(b"II*\x00")
    with pytest.raises(UserError, match=r"x\.tif: unsupported"):
        load_array(tmp_path / "x.tif")


def test_envi_without_spectral_says_how_to_install(tmp_path):
    try:
        import spectral  # noqa: F401
        pytest.skip("spectral is installed")
    except ImportError:
        pass
    (tmp_path / "scene.hdr").write_text("ENVI\n")
    with pytest.raises(UserError, match=r"scene\.hdr.*pip install spectral"):
        load_array(tmp_path / "scene.hdr")


def test_unknown_scene_and_misplaced_options():
    with pytest.raises(UserError, match="unknown scene.*SalinasA"):
        load_scene("Houston")
    with pytest.raises(UserError, match="only used with --dataset=custom"):
        load_scene("SalinasA", cube="x.mat")
    with pytest.raises(UserError, match="needs --cube"):
        load_scene("custom")
