"""Corrupted files and odd arrays: the loaders either succeed or raise UserError, nothing else."""
import io

import numpy as np
import pytest
import scipy.io

from data import load_scene
from data.loading import load_array
from utils.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore")  # scipy/numpy warn about bad files; only errors matter


def _valid_files():
    """Bytes of small valid files: {suffix: bytes}."""
    rng = np.random.default_rng(0)
    cube = rng.integers(0, 500, size=(6, 7, 3)).astype(np.int16)
    gt = (np.arange(42).reshape(6, 7) % 3).astype(np.uint8)
    mat, npy, npz = io.BytesIO(), io.BytesIO(), io.BytesIO()
    scipy.io.savemat(mat, {"cube": cube, "gt": gt})
    np.save(npy, cube)
    np.savez(npz, cube=cube, gt=gt)
    return {".mat": mat.getvalue(), ".npy": npy.getvalue(), ".npz": npz.getvalue()}


def _mutate(rng, data):
    kind = rng.integers(3)
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 2000)))
    if kind == 1:
        return data[:int(rng.integers(0, len(data)))]
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(len(buf)))
        buf[i] ^= 1 << int(rng.integers(8))
    return bytes(buf)


def _only_user_errors(fn, *args, **kw):
    """True if fn succeeded, False if it raised UserError; anything else fails the test."""
    try:
        fn(*args, **kw)
    except UserError:
        return False
    return True


def test_corrupted_bytes(tmp_path):
    rng = np.random.default_rng(1234)
    valid = _valid_files()
    gt_path = tmp_path / "good_gt.mat"
    gt_path.write_bytes(valid[".mat"])
    outcomes = []
    for i in range(300):
        suffix = list(valid)[i % 3]
        path = tmp_path / f"f{i}{suffix}"
        path.write_bytes(_mutate(rng, valid[suffix]))
        layout = ("auto", "HWB", "BHW")[i % 3]
        outcomes.append(_only_user_errors(load_array, path, expect_ndim=int(rng.integers(2, 4)), layout=layout))
        _only_user_errors(load_scene, "custom", cube=f"{path}", gt=f"{gt_path}:gt", layout=layout)
        _only_user_errors(load_scene, "custom", cube=f"{gt_path}:cube", gt=f"{path}", layout="HWB")
    assert 0 < sum(outcomes) < len(outcomes)  # some mutations are harmless, most are not


def _random_array(rng):
    ndim = int(rng.integers(0, 5))
    shape = tuple(int(s) for s in rng.integers(0, 6, size=ndim))
    kind = rng.integers(7)
    if kind == 0:
        arr = rng.normal(size=shape)
        arr[rng.random(shape) < 0.2] = np.nan
    elif kind == 1:
        arr = rng.random(shape) < 0.5
    elif kind == 2:
        arr = rng.integers(-3, 4, size=shape).astype(np.int8)
    elif kind == 3:
        arr = rng.integers(0, 2**63, size=shape, dtype=np.uint64)
    elif kind == 4:
        arr = (rng.normal(size=shape) + 1j).astype(np.complex64)
    elif kind == 5:
        arr = np.empty(shape, dtype=object)
        arr.fill("text")
    else:
        arr = rng.integers(0, 4, size=shape).astype(np.float32) * np.array(1e39, dtype=np.float64)
    return arr


def test_random_arrays(tmp_path):
    rng = np.random.default_rng(5678)
    paths, loaded = [], 0
    for i in range(150):
        arr = _random_array(rng)
        path = tmp_path / f"a{i}{('.npy', '.npz', '.mat')[i % 3]}"
        try:  # writers refuse some combinations (e.g. 0-D object arrays in .mat): not what is tested
            if path.suffix == ".npy":
                np.save(path, arr, allow_pickle=True)
            elif path.suffix == ".npz":
                np.savez(path, x=arr)
            else:
                scipy.io.savemat(path, {"x": arr})
        except Exception:
            continue
        paths.append(path)
        for ndim in (2, 3):
            loaded += _only_user_errors(load_array, path, expect_ndim=ndim, layout=("auto", "HWB", "BHW")[i % 3])
    for cube, gt in zip(paths, paths[1:] + paths[:1]):
        _only_user_errors(load_scene, "custom", cube=str(cube), gt=str(gt), layout="HWB")
        _only_user_errors(load_scene, "custom", cube=str(cube), gt=str(cube), layout="BHW")
    assert loaded > 0
