"""One error type for everything a user can get wrong, and the wrapper that prints it.

A `UserError` becomes one line on stderr and exit code 2, never a traceback:
bad files, wrong keys, unknown `--name=value`, mismatched weights. An OSError about a
path that escapes a script (a folder that is a file, no permission, a full disk) is
printed the same way, naming the path.
"""
import errno
import os
import signal
import sys
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


INTERRUPTED = "interrupted: the last complete checkpoint is kept; rerun with --resume=true to continue"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


# Errors of the machine rather than the program: one line even when no path is attached
# (a write that fills the disk names no file).
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS, errno.EIO}
_PATH_ERRORS = (FileExistsError, NotADirectoryError, PermissionError, IsADirectoryError, FileNotFoundError)
_HINTS = {errno.ENOSPC: "the disk is full", getattr(errno, "EDQUOT", -1): "the disk quota is used up",
          errno.EROFS: "the file system is read-only", errno.EACCES: "no permission to read or write it",
          errno.EPERM: "no permission to do that", errno.EISDIR: "it is a folder, not a file"}


def _name(path):
    """An OSError's filename as text (it may be str, bytes, a PathLike or a file descriptor)."""
    return os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)


def _what_went_wrong(err, path):
    """A few words on why `err` happened at `path`: which part of the path is a file, for instance."""
    from utils.fileio import first_non_folder  # fileio imports this module
    if err.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = first_non_folder(path)
        if blocker is not None:
            return f"{'it' if blocker == Path(path) else blocker} is a file, not a folder"
        return "it already exists" if err.errno == errno.EEXIST else "a part of it is not a folder"
    return _HINTS.get(err.errno, "")


def os_error_message(err):
    """One line for an OSError that a user can fix, or None for one that looks like a bug.

    'PATH: what went wrong (strerror)'; rename errors name both paths.
    """
    path = err.filename
    if path is None and not isinstance(err, _PATH_ERRORS) and err.errno not in _ENVIRONMENT_ERRNOS:
        return None
    reason = err.strerror or str(err) or type(err).__name__
    what = _what_went_wrong(err, _name(path)) if path is not None else _HINTS.get(err.errno, "")
    line = f"{what} ({reason})" if what else reason
    if path is not None:
        where = _name(path) + (f" -> {_name(err.filename2)}" if err.filename2 is not None else "")
        line = f"{where}: {line}"
    return line.replace("\n", "\\n")


def run_main(main, argv=None, interrupted=INTERRUPTED):
    """Run `main(argv)`; turn a UserError into a one-line message and exit 2.

    An OSError that names a path (or reports a full or read-only disk) is printed the
    same way, `error: PATH: what went wrong (strerror)`, exit 2; any other exception
    keeps its traceback, as it is a bug to fix.

    Ctrl-C and SIGTERM exit 130 with the one line `interrupted`, after whatever `main`
    saved on the way out (SIGTERM is raised as KeyboardInterrupt, so a half-written
    file is removed by atomic_path instead of being left behind by a hard exit).
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        line = os_error_message(err)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
