"""One error type for everything a user can get wrong, and the wrapper that prints it.

A `UserError` becomes one line on stderr and exit code 2, never a traceback:
bad files, wrong keys, unknown `--name=value`, mismatched weights.
"""
import signal
import sys


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


INTERRUPTED = "interrupted: the last complete checkpoint is kept; rerun with --resume=true to continue"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_main(main, argv=None, interrupted=INTERRUPTED):
    """Run `main(argv)`; turn a UserError into a one-line message and exit 2.

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
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
