"""Atomic writes: a file is either complete under its final name or absent.

Every artefact (weights, checkpoints, JSON, PNG, caches) is written to a
temporary file in the same folder, flushed and fsynced, then renamed.
"""
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the process umask, for the mode of new files


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
