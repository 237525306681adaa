"""Atomic writes: a file is either complete under its final name or absent.

Every artefact (weights, checkpoints, JSON, PNG, caches) is written to a
temporary file in the same folder, flushed and fsynced, then renamed.
`check_output_dir` refuses an output folder that cannot be made, before any work.
"""
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from utils.errors import UserError


_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the process umask, for the mode of new files


def first_non_folder(path):
    """The first of `path`, its parents, ... that exists but is not a folder (a Path), else None.

    A folder can never be made below it. Never creates or changes anything.
    """
    path = Path(path)
    for part in reversed((path, *path.parents)):  # from the top down: the first blocker is the one to name
        if os.path.lexists(part) and not os.path.isdir(part):
            return part
    return None


def _first_existing(path):
    """`path` or its nearest parent that exists (Path("."), at worst, for a relative path)."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if os.path.isdir(p)), Path("."))


def check_output_dir(path, setting):
    """Refuse, in one line naming `setting`, an output folder that cannot be used.

    path: the folder the run will write into (it need not exist yet); setting: how the
    user chose it, e.g. "--results_dir=out" or "the weights folder". Raises UserError when
    `path` or one of its parents is a file (or a broken link), or when `path`, or the
    parent it would be made in, is not writable. Creates nothing.
    """
    blocker = first_non_folder(path)
    if blocker is not None:
        what = "a broken link" if not os.path.exists(blocker) else "a file"
        raise UserError(f"{setting}: {blocker} is {what}, not a folder; move or rename it, or write elsewhere")
    base = _first_existing(path)
    if not os.access(base, os.W_OK | os.X_OK):
        if base == Path(path):
            raise UserError(f"{setting}: {path} is not writable; fix its permissions or write elsewhere")
        raise UserError(f"{setting}: cannot make {path}: {base} is not writable; fix its permissions or "
                        f"write elsewhere")


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` on success.

    On any exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes 0600 files; give the result the mode a plain open() would (or the old file's)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def finite_or_none(obj):
    """NaN / inf -> None, recursively: the output stays strict JSON (jq, JavaScript can read it)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(path, obj):
    """Write `obj` as indented strict JSON (NaN and inf become null), atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(finite_or_none(obj), indent=2, allow_nan=False) + "\n")


def write_text(path, text):
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
