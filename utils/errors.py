"""One error type for everything a user can get wrong, and the wrapper that prints it.

A `UserError` becomes one line on stderr and exit code 2, never a traceback:
bad files, wrong keys, unknown `--name=value`, mismatched weights.
"""
import sys


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def run_main(main, argv=None):
    """Run `main(argv)`; turn a UserError into a one-line message and exit 2.

    Ctrl-C exits 130 with one line, after whatever `main` saved on the way out.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept; rerun with --resume=true to continue",
              file=sys.stderr)
        sys.exit(130)
