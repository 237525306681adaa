"""The one place that turns `--device=auto|cpu|cuda[:i]` into a torch.device."""
import torch

from utils.errors import UserError


def pick_device(name):
    """'auto' -> CUDA when present, else CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name}: CUDA is not available on this machine; use --device=auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name}: expected auto, cpu or cuda[:index]") from None


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def release_freed_memory(threshold_bytes=1 << 20):
    """Ask glibc's malloc to give every block >= threshold_bytes its own mapping, returned to
    the system when freed; returns True when set (False off glibc, e.g. macOS or Windows).

    By default glibc raises that threshold to the size of the largest block freed so far
    (up to 32 MB), then serves such blocks from a heap that never shrinks: after one
    training step, tens of MB-sized activations stay resident. With low_memory this
    keeps peak RSS near what is alive (docs/BENCHMARKS.md), at the cost of more page faults.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False
