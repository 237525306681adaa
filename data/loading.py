"""Reading scenes from disk (downloading the known ones when missing) and checking them.

Every problem with a file becomes a `UserError` that names the file; no traceback
from scipy, h5py or numpy reaches the user.
"""
import hashlib
import io
import json
import math
import os
import struct
import sys
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.scenes import SCENES, palette
from utils.errors import UserError
from utils.fileio import atomic_path, first_non_folder

LAYOUTS = ("auto", "HWB", "BHW")
_CHUNK = 1 << 16


DEFAULT_DATA_DIR = "datasets"


def resolve_data_dir(data_dir=""):
    """The data folder: `data_dir` if non-empty, else $HSI_DATA_DIR, else ./datasets."""
    return Path(data_dir or os.environ.get("HSI_DATA_DIR", "") or DEFAULT_DATA_DIR)


def _data_dir_setting(data_dir):
    """How the data folder was chosen, as the user would write it, and the way to the fallback."""
    env = os.environ.get("HSI_DATA_DIR", "")
    if data_dir:
        fallback = f"$HSI_DATA_DIR ({env})" if env else f"./{DEFAULT_DATA_DIR}"
        return f"--data_dir={data_dir}", f"leave --data_dir empty to use {fallback}"
    if env:
        return f"HSI_DATA_DIR={env}", f"unset HSI_DATA_DIR to use ./{DEFAULT_DATA_DIR}, or pass --data_dir=FOLDER"
    return f"the default data folder ./{DEFAULT_DATA_DIR}", "pass --data_dir=FOLDER"


def check_data_dir(data_dir="", dataset="", missing_ok=False):
    """The data folder of `resolve_data_dir(data_dir)`, refused in one line when unusable.

    A folder the user named (`data_dir`, else $HSI_DATA_DIR) must exist: a mistyped name
    is refused rather than created and downloaded into; the default ./datasets may be
    missing (it is made on the first download). A path that is, or lies below, a file is
    always refused. `missing_ok`: accept a missing named folder too (library callers
    that ask for a new folder to download into). dataset "custom" reads no data folder,
    so nothing is checked. Creates nothing; returns the Path.
    """
    folder = resolve_data_dir(data_dir)
    if dataset.lower() == "custom":
        return folder
    setting, fallback = _data_dir_setting(data_dir)
    blocker = first_non_folder(folder)
    if blocker is not None:
        raise UserError(f"{setting}: {blocker} is a file, not a folder; {fallback}")
    named = bool(data_dir or os.environ.get("HSI_DATA_DIR", ""))
    if named and not missing_ok and not folder.is_dir():
        raise UserError(f"{setting}: no such folder; create it, or {fallback}")
    return folder


# ----------------------------------------------------------------------------- arrays


# MAT v5 data-element types -> item size (miINT8 .. miUINT64); see MATLAB's "MAT-File Format".
_MI_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MX_NUMERIC = range(6, 16)  # mxDOUBLE_CLASS .. mxUINT64_CLASS


def _mat5_elements(buf, order):
    """Yield (type, payload) of the consecutive data elements in `buf` (padded to 8 bytes)."""
    pos = 0
    while pos < len(buf):
        if len(buf) - pos < 8:
            raise ValueError("truncated data element")
        mdtype, nbytes = struct.unpack_from(order + "II", buf, pos)
        if mdtype >> 16:  # small data element: size and type share a word, data in the next
            mdtype, nbytes = mdtype & 0xFFFF, mdtype >> 16
            if nbytes > 4:
                raise ValueError("bad small data element")
            yield mdtype, buf[pos + 4:pos + 4 + nbytes]
            pos += 8
            continue
        if nbytes > len(buf) - pos - 8:
            raise ValueError("data element runs past the end of the file")
        yield mdtype, buf[pos + 8:pos + 8 + nbytes]
        pos += 8 + nbytes + (-nbytes % 8)


def _mat5_numeric_names(data):
    """Names of the well-formed numeric variables of a MAT v5 file (bytes).

    scipy's reader trusts the file and can crash the interpreter on a corrupted
    one (it indexes a table with the stored element type), so the structure is
    checked here first and scipy is only asked for variables checked this way.
    Raises ValueError on anything malformed.
    """
    order = {b"IM": "<", b"MI": ">"}[data[126:128]]
    names, numeric, pos = [], [], 128
    while pos < len(data):
        if len(data) - pos < 8:
            raise ValueError("truncated variable")
        mdtype, nbytes = struct.unpack_from(order + "II", data, pos)
        if nbytes == 0 or nbytes > len(data) - pos - 8:
            raise ValueError("variable runs past the end of the file")
        payload = data[pos + 8:pos + 8 + nbytes]
        pos += 8 + nbytes  # scipy does not pad between top-level variables
        if mdtype == _MI_COMPRESSED:
            payload = zlib.decompress(payload)
            mdtype, nbytes = struct.unpack_from(order + "II", payload) if len(payload) >= 8 else (0, 0)
            if nbytes > len(payload) - 8:
                raise ValueError("compressed variable is shorter than it says")
            payload = payload[8:8 + nbytes]
        if mdtype != _MI_MATRIX:
            raise ValueError(f"unexpected element type {mdtype}")
        parts = list(_mat5_elements(payload, order))
        if len(parts) < 3 or parts[0][0] != 6 or len(parts[0][1]) != 8 or parts[1][0] != 5 \
                or len(parts[1][1]) < 8 or len(parts[1][1]) % 4:
            raise ValueError("bad array header")
        flags = struct.unpack_from(order + "I", parts[0][1])[0]
        dims = struct.unpack(order + f"{len(parts[1][1]) // 4}i", parts[1][1])
        name = bytes(parts[2][1]).decode("latin1")
        if name in names:
            raise ValueError(f"variable {name!r} appears twice")
        names.append(name)
        if flags & 0xFF not in _MX_NUMERIC:
            continue  # structs, cells, chars, sparse: never loaded, so never parsed
        values = parts[3:5 if flags & 0x800 else 4]  # real part, and imaginary part if complex
        if len(values) != (2 if flags & 0x800 else 1) or any(
                mi not in _MI_ITEMSIZE or min(dims) < 0 or len(v) != math.prod(dims) * _MI_ITEMSIZE[mi]
                for mi, v in values):
            raise ValueError(f"variable {name!r}: data does not match its dimensions {dims}")
        numeric.append(name)
    return numeric


def _read_mat(path):
    """{name: array} of the numeric variables of a MATLAB v5 or v7.3 file."""
    import h5py
    if h5py.is_hdf5(path):
        out = {}
        with h5py.File(path, "r") as f:
            for name, item in f.items():
                # '#refs#' and MATLAB structs are groups; only plain datasets are arrays.
                if (isinstance(item, h5py.Dataset) and not name.startswith("#")
                        and item.attrs.get("MATLAB_class", b"") != b"char"):
                    # MATLAB is column-major: HDF5 stores every array with its axes reversed.
                    out[name] = np.asarray(item[()]).T
        return out
    data = path.read_bytes()
    if len(data) < 128 or data[126:128] not in (b"IM", b"MI"):
        raise UserError(f"{path}: not a MATLAB v5 or v7.3 file (MATLAB v4 and other formats are not supported)")
    import scipy.io
    names = _mat5_numeric_names(data)
    mat = scipy.io.loadmat(io.BytesIO(data), variable_names=names) if names else {}
    return {k: v for k, v in mat.items() if not k.startswith("__")}


def _read_npy(path):
    # mmap first: a header that declares more data than the file holds fails here
    # instead of allocating the declared size.
    mm = np.load(path, mmap_mode="r", allow_pickle=False)
    arr = np.array(mm)
    del mm
    return {"array": arr}


def _read_npz(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _read_envi(path):
    try:
        import spectral.io.envi as envi
    except ImportError:
        raise UserError(f"{path}: reading ENVI files needs the 'spectral' package: pip install spectral") from None
    hdr = path if path.suffix.lower() == ".hdr" else path.with_suffix(".hdr")
    # ENVI images load as (rows, cols, bands) whatever the interleave.
    return {"array": np.asarray(envi.open(str(hdr)).load())}


_READERS = {".mat": _read_mat, ".npy": _read_npy, ".npz": _read_npz, ".hdr": _read_envi, ".img": _read_envi}


def _read_all(path):
    if not path.is_file():
        where = "" if path.is_absolute() else f" (looked for {path.resolve()})"
        raise UserError(f"{path}: file not found{where}")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; expected .mat, .npy, .npz or ENVI .hdr/.img")
    try:
        arrays = reader(path)
    except UserError:
        raise
    except Exception as err:  # scipy/h5py/numpy raise many types on bad bytes; all mean "unreadable"
        detail = " ".join(f"{type(err).__name__}: {err}".split())[:300]  # one line, bounded
        raise UserError(f"{path}: cannot read it as a {path.suffix} file ({detail})") from None
    # Structs, cells and strings are not images; only numeric arrays are candidates.
    return {k: v for k, v in arrays.items()
            if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}


def _describe(arrays):
    return ", ".join(f"{k!r} {v.shape} {v.dtype}" for k, v in arrays.items()) or "no numeric arrays"


def _pick(path, arrays, key, expect_ndim):
    """The array under `key`, or the single `expect_ndim`-D array when key is None."""
    if key and path.suffix.lower() in (".mat", ".npz"):  # other formats hold one unnamed array
        if key not in arrays:
            raise UserError(f"{path}: no array named {key!r}; found {_describe(arrays)}")
        return key, arrays[key]
    candidates = {k: v for k, v in arrays.items() if v.ndim == expect_ndim}
    if len(candidates) == 1:
        return next(iter(candidates.items()))
    if not candidates:
        raise UserError(f"{path}: no {expect_ndim}-D numeric array; found {_describe(arrays)}")
    raise UserError(f"{path}: several {expect_ndim}-D arrays ({_describe(candidates)}); "
                    f"name one as {path}:KEY")


def _guess_layout(path, shape):
    """'HWB' or 'BHW' from the shape alone: the bands axis must be clearly the odd one out."""
    first, _, last = shape
    if 2 * last <= min(shape[:2]) and 2 * first > min(shape[1:]):
        return "HWB"
    if 2 * first <= min(shape[1:]) and 2 * last > min(shape[:2]):
        return "BHW"
    raise UserError(f"{path}: cannot tell which axis holds the bands in shape {shape}; "
                    f"pass --layout=HWB (rows, cols, bands) or --layout=BHW (bands, rows, cols)")


def load_array(path, key=None, expect_ndim=3, layout="auto"):
    """Read one numeric array from a .mat (v5 or v7.3), .npy, .npz or ENVI .hdr/.img file.

    key: the variable name; None picks the only `expect_ndim`-D array in the file
    (ignored for single-array files: .npy, ENVI).
    layout: for 3-D arrays, "HWB", "BHW" or "auto" (guess from the shape).
    Returns the array as stored in the file's dtype; a cube as (H, W, B).
    Raises UserError naming the file for anything unreadable or unexpected.
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise UserError(f"--layout={layout}: expected one of {', '.join(LAYOUTS)}")
    name, arr = _pick(path, _read_all(path), key or None, expect_ndim)
    what = f"array {name!r}" if path.suffix.lower() in (".mat", ".npz") else "the array"
    if arr.ndim != expect_ndim:
        raise UserError(f"{path}: {what} has shape {arr.shape}; expected a {expect_ndim}-D array")
    if arr.size == 0:
        raise UserError(f"{path}: {what} is empty (shape {arr.shape})")
    if expect_ndim == 3:
        if layout == "auto":
            layout = _guess_layout(path, arr.shape)
        if layout == "BHW":
            arr = arr.transpose(1, 2, 0)
    return np.ascontiguousarray(arr)


# ----------------------------------------------------------------------------- downloads


def download(url, dest, size, sha256, timeout=60):
    """Download `url` to `dest`, checking its size and SHA-256 (either may be None to skip).

    The data goes to a temporary file beside `dest` and is renamed only once it is
    complete and correct, so an interrupted or bad download leaves nothing behind.
    Returns `dest` as a Path.
    """
    from tqdm import tqdm
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        got, digest = 0, hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                announced = resp.headers.get("Content-Length")
                total = int(announced) if announced and announced.isdigit() else size
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, file=sys.stderr,
                          ncols=80, leave=True) as bar:
                    for chunk in iter(lambda: resp.read(_CHUNK), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
        except Exception as err:  # URLError, timeouts, resets, IncompleteRead
            raise UserError(f"downloading {dest.name} from {url} failed: {type(err).__name__}: {err}") from None
        # urllib returns a short body without error when the server closes early.
        if announced and announced.isdigit() and got != int(announced):
            raise UserError(f"downloading {dest.name} from {url} was cut off after {got} of {announced} bytes")
        if size is not None and got != size:
            raise UserError(f"downloaded {dest.name} from {url} has {got} bytes, expected {size}")
        if sha256 and digest.hexdigest() != sha256.lower():
            raise UserError(f"downloaded {dest.name} from {url} has SHA-256 {digest.hexdigest()}, "
                            f"expected {sha256}; the file was deleted")
    return dest


def ensure_file(scene_info, which, data_dir, download=True):
    """Path of a scene's "cube" or "gt" file in `data_dir`, downloading it when missing.

    A file already present is checked by size only, so loading stays fast; the full
    SHA-256 is checked right after each download. A wrong size means a partial or
    different file and raises UserError (delete it to download again).
    """
    spec = getattr(scene_info, which)
    path = Path(data_dir) / spec.name
    if path.is_file():
        actual = path.stat().st_size
        if spec.size and actual != spec.size:
            raise UserError(f"{path} has {actual} bytes, expected {spec.size} for {scene_info.name}; it is incomplete "
                            f"or a different file: delete it to download it again, or load it with --dataset=custom")
        return path
    if not spec.url:
        raise UserError(f"{spec.name} not found in {Path(data_dir).resolve()} and it has no download address; "
                        f"put it there or pass --data_dir=FOLDER")
    if not download:
        raise UserError(f"{spec.name} not found: looked in {Path(data_dir).resolve()}; download it from {spec.url} "
                        f"with: curl -L -o {path} {spec.url}  (or rerun with downloads allowed)")
    return _fetch(spec, path)


def _fetch(spec, path):
    # `download` is shadowed by ensure_file's flag of the same name.
    return download(spec.url, path, spec.size, spec.sha256)


# ----------------------------------------------------------------------------- scenes


@dataclass
class Scene:
    """A loaded scene.

    cube: (H, W, B) float32 raw values (not standardised).
    gt: (H, W) int64, 0 = unlabelled, 1..K = class.
    class_names: K names, class k is class_names[k - 1].
    palette: (K+1, 3) uint8, row 0 background.
    rgb_bands: 3 band indices for false-colour display.
    files: {"cube": Path, "gt": Path} actually read.
    label_values: K raw gt values that became classes 1..K.
    """
    name: str
    cube: np.ndarray
    gt: np.ndarray
    class_names: list
    palette: np.ndarray
    rgb_bands: tuple
    files: dict = field(default_factory=dict)
    label_values: tuple = ()

    @property
    def n_classes(self):
        return len(self.class_names)

    @property
    def n_bands(self):
        return self.cube.shape[2]

    @property
    def shape(self):
        """(H, W)."""
        return self.gt.shape


def _split_spec(spec):
    """'PATH[:KEY]' -> (Path, key or None). The key never contains a path separator."""
    if Path(spec).is_file():
        return Path(spec), None
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and not any(s in tail for s in "/\\"):
        return Path(head), tail
    return Path(spec.rstrip(":")), None


def _check_cube(path, cube):
    """Raw cube -> float32, refusing NaN/inf (also those made by float32 overflow)."""
    out = cube.astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad:
        raise UserError(f"{path}: cube has {bad} NaN or infinite values (of {out.size}); fix or fill them first")
    return out


def _check_gt(path, gt):
    """Integer-valued, non-negative gt -> int64."""
    if gt.dtype.kind == "f":
        n = int(np.count_nonzero(~np.isfinite(gt) | (gt != np.floor(gt))))
        if n:
            raise UserError(f"{path}: ground truth has {n} non-integer values; labels must be whole numbers")
    if gt.size and gt.min() < 0:
        raise UserError(f"{path}: ground truth has negative values (min {gt.min()}); use 0 for unlabelled")
    if gt.size and gt.max() > np.iinfo(np.int32).max:
        raise UserError(f"{path}: ground truth has label {gt.max()}, too large to be a class index")
    return gt.astype(np.int64)


def _remap(path, gt, label_values):
    """Raw labels (H, W) -> (H, W) int64 0..K; a positive value outside `label_values` is an error."""
    values = np.unique(gt[gt > 0])
    unknown = np.setdiff1d(values, label_values)
    if unknown.size:
        raise UserError(f"{path}: ground truth has values {unknown[:10].tolist()} that are not classes of this "
                        f"scene (expected 0 and {list(label_values)})")
    # label_values are ascending, so a value's position among them is its class - 1.
    return np.where(gt > 0, np.searchsorted(np.asarray(label_values, dtype=np.int64), gt) + 1, 0)


def _check_scene(name, files, cube, gt, class_names, label_values=()):
    """Cube and gt agree in size, and every class 1..K has at least 2 pixels.

    label_values: the raw gt values of classes 1..K, named in the message (a class's
    number is its rank among the file's labels, not the value in the file).
    """
    cube_path, gt_path = files["cube"], files["gt"]
    if cube.shape[:2] != gt.shape:
        raise UserError(f"{cube_path} is {cube.shape[0]} x {cube.shape[1]} pixels but {gt_path} is "
                        f"{gt.shape[0]} x {gt.shape[1]}; cube and ground truth must match")
    counts = np.bincount(gt.ravel(), minlength=len(class_names) + 1)
    if counts[1:].sum() == 0:
        raise UserError(f"{gt_path}: no labelled pixels (all 0)")
    for k, n in enumerate(counts[1:], start=1):
        if n < 2:  # a class needs a pixel to train on and one to test on
            # the value in the file is what the user can look up; k is its rank among the labels
            label = f", label {label_values[k - 1]} in the file," if label_values else ""
            raise UserError(f"{gt_path}: class {k} ({class_names[k - 1]!r}) of {name}{label} has {n} labelled "
                            f"pixel(s); each class needs at least 2")


def _load_known(info, data_dir, download, layout):
    """Cube (H, W, B) and raw gt (H, W) of a table scene, plus the files read."""
    if info.crop_of and not (data_dir / info.cube.name).is_file():
        try:
            cube, gt, files = _load_known(SCENES[info.crop_of], data_dir, download, layout)
        except UserError as err:
            raise UserError(f"{info.cube.name} not found in {data_dir.resolve()}, and cutting {info.name} from "
                            f"the full {info.crop_of} scene failed: {err}") from None
        r0, r1, c0, c1 = info.crop
        return cube[r0:r1, c0:c1], gt[r0:r1, c0:c1], files
    files = {w: ensure_file(info, w, data_dir, download) for w in ("cube", "gt")}
    # The GIC files are (rows, cols, bands); their shapes need no guessing.
    cube = load_array(files["cube"], info.cube.key, 3, "HWB" if layout == "auto" else layout)
    gt = load_array(files["gt"], info.gt.key, 2)
    if cube.shape != tuple(info.shape):
        raise UserError(f"{files['cube']}: cube has shape {cube.shape}, expected {tuple(info.shape)} "
                        f"(rows, cols, bands) for {info.name}")
    return cube, gt, files


def _read_class_names(path, k):
    try:
        names = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read class names as JSON ({err})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) != k:
        raise UserError(f"{path}: expected a JSON list of {k} class names (one per label value), got {names!r:.200}")
    return names


def scene_name(name):
    """The scene's proper name for a --dataset value given in any case ("salinasa" ->
    "SalinasA"; "custom" stays), or a one-line error. Folders (weights/, runs/, results/) are
    named after it, so two spellings never make two folders."""
    lookup = {n.lower(): n for n in SCENES}
    if name.lower() == "custom":
        return "custom"
    if name.lower() not in lookup:
        raise UserError(f"--dataset={name}: unknown scene; expected one of {', '.join(SCENES)}, custom")
    return lookup[name.lower()]


def check_scene_args(name, cube="", gt="", class_names=""):
    """The scene's proper name, once its arguments agree: a custom scene names its cube and gt
    files, a known scene none (one-line UserError otherwise). Reads no file."""
    name = scene_name(name)
    if name == "custom" and (not cube or not gt):
        raise UserError("--dataset=custom needs --cube=PATH[:KEY] and --gt=PATH[:KEY]")
    if name != "custom" and (cube or gt or class_names):
        raise UserError(f"--cube, --gt and --class_names are only used with --dataset=custom, not {name}")
    return name


def load_scene(name, data_dir="", download=True, cube="", gt="", class_names="", layout="auto"):
    """Load a scene by name (see `SCENES`), or "custom" from the `cube` and `gt` specs.

    cube, gt: "PATH[:KEY]" (custom only). class_names: path to a JSON list of K
    names (custom only; default "class 1".."class K"). Known scenes are looked for
    in `resolve_data_dir(data_dir)` and downloaded when missing if `download`.
    Custom gt values are remapped from their sorted distinct positive values to
    1..K (kept in `Scene.label_values`). Returns a `Scene` (cube (H, W, B) float32,
    gt (H, W) int64). Raises UserError for any bad or inconsistent input.
    """
    name = check_scene_args(name, cube, gt, class_names)
    if name == "custom":
        (cube_path, cube_key), (gt_path, gt_key) = _split_spec(cube), _split_spec(gt)
        raw_cube = load_array(cube_path, cube_key, 3, layout)
        raw_gt = load_array(gt_path, gt_key, 2)
        files = {"cube": cube_path, "gt": gt_path}
        info = None
    else:
        info = SCENES[name]
        # a named missing folder may be made here: the scripts refuse one first with check_data_dir
        folder = check_data_dir(data_dir, name, missing_ok=True)
        raw_cube, raw_gt, files = _load_known(info, folder, download, layout)
    cube_arr = _check_cube(files["cube"], raw_cube)
    gt_arr = _check_gt(files["gt"], raw_gt)
    if info is None:
        values = tuple(int(v) for v in np.unique(gt_arr[gt_arr > 0]))
        names = (_read_class_names(class_names, len(values)) if class_names
                 else [f"class {k}" for k in range(1, len(values) + 1)])
        n_bands = cube_arr.shape[2]
        rgb = (n_bands * 3 // 4, n_bands // 2, n_bands // 4)  # spread over the spectrum, long to short
    else:
        values, names, rgb = info.label_values, list(info.class_names), info.rgb_bands
    gt_arr = _remap(files["gt"], gt_arr, values)
    _check_scene(name, files, cube_arr, gt_arr, names, values)
    return Scene(name=name, cube=cube_arr, gt=gt_arr, class_names=list(names), palette=palette(len(names)),
                 rgb_bands=tuple(rgb), files=files, label_values=tuple(values))
