"""The one place that turns `--device=auto|cpu|cuda[:i]` into a torch.device, and the CPU's
allocator and precision settings the scripts run with."""
from contextlib import nullcontext

import torch

from utils.errors import UserError


def pick_device(name):
    """'auto' -> CUDA when present, else CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name}: CUDA is not available on this machine; use --device=auto or cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name}: expected auto, cpu or cuda[:index]") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device={name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def host_to_device(t, device):
    """A CPU tensor `t` on `device`, without making the host wait for the GPU.

    On CUDA a copy from ordinary (pageable) host memory first waits for the stream's queued
    work, so a training step that copies its random numbers over would stall the host once
    per copy; from pinned memory the copy is queued like a kernel (non_blocking). Elsewhere
    a plain .to(device).
    """
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc mallopt parameters


def _mallopt(*settings):
    """glibc mallopt(param, value) for each (param, value); True when every one is accepted."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all(bool(libc.mallopt(param, int(value))) for param, value in settings)
    except (OSError, AttributeError):
        return False


def keep_freed_memory():
    """Ask glibc's malloc to serve large blocks from its heap and keep freed ones for reuse;
    returns True when set (False off glibc, e.g. macOS or Windows).

    By default glibc maps every block over 32 MB afresh and unmaps it when freed, so each
    training step's 376 MB activations (paper preset, batch 256) are new pages that the
    kernel zeroes on first touch (`python -m bench.micro`: filling a fresh 376 MB tensor 44 ms,
    an existing one 25 ms, on the session-3 machine). Kept, they are reused from step to step:
    pretraining steps about 1.4x faster in `bench.run` (docs/BENCHMARKS.md, session 4: against
    `--keep_freed_memory=false`), at the cost of peak RSS (the heap fragments).
    `low_memory` uses release_freed_memory instead.
    """
    return _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1))


def set_allocator_policy(device, low_memory, keep_freed=True):
    """The CPU allocator setting the scripts run with: with low_memory, freed memory goes back
    to the system (release_freed_memory); otherwise freed activations are kept for reuse
    (keep_freed_memory, faster), or with keep_freed=False (a benchmark option) glibc's defaults
    stay. Nothing on other devices. Returns a one-line note when low_memory could not be
    honoured (not glibc), else None."""
    if low_memory:
        if not release_freed_memory():
            return ("note: --low_memory could not set glibc malloc's mmap threshold (another C library); "
                    "activations are still recomputed, but freed memory may stay resident")
    elif keep_freed and device.type == "cpu":
        keep_freed_memory()
    return None


def fused_adam(device):
    """Whether torch's fused Adam (one kernel over all parameters) runs on `device`."""
    return device.type in ("cpu", "cuda")


def release_freed_memory(threshold_bytes=1 << 20):
    """Ask glibc's malloc to give every block >= threshold_bytes its own mapping, returned to
    the system when freed; returns True when set (False off glibc, e.g. macOS or Windows).

    By default glibc raises that threshold to the size of the largest block freed so far
    (up to 32 MB), then serves such blocks from a heap that never shrinks: after one
    training step, tens of MB-sized activations stay resident. With low_memory this
    keeps peak RSS near what is alive (docs/BENCHMARKS.md), at the cost of more page faults.
    """
    return _mallopt((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, threshold_bytes))


def cpu_has_bf16():
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX), which oneDNN uses for bf16
    convolutions and matmuls; without it bf16 is emulated and slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def check_cpu_amp(device, cpu_amp):
    """Refuse --cpu_amp=true (UserError) where it would run on a CPU without bf16 arithmetic."""
    if device.type == "cpu" and cpu_amp and not cpu_has_bf16():
        raise UserError("--cpu_amp=true: this CPU has no bf16 arithmetic that torch uses (x86 AVX512-BF16 or "
                        "AMX), so bf16 would be emulated and slower than float32; leave --cpu_amp=false")


def cuda_has_bf16(device):
    """Whether the GPU has bf16 arithmetic (compute capability 8.0 or later: A100, RTX 30xx and
    newer); older ones (T4, V100, RTX 20xx) emulate bf16 matmuls slowly and cuDNN has no bf16
    convolutions for them."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def training_precision(device, amp, cpu_amp):
    """'bf16' where training runs the encoder's forward under bf16 autocast, else 'float32'.

    amp: bf16 on a GPU with bf16 arithmetic (float32 on older GPUs: amp_note says so).
    cpu_amp: bf16 on the CPU, for CPUs with bf16 arithmetic only (check_cpu_amp refuses others).
    Scripts record it with their results, as amp and cpu_amp alone do not say what ran.
    """
    if device.type == "cuda" and amp:
        return "bf16" if cuda_has_bf16(device) else "float32"
    if device.type == "cpu" and cpu_amp:
        check_cpu_amp(device, cpu_amp)
        return "bf16"
    return "float32"


def amp_note(device, amp):
    """A one-line note when --amp=true falls back to float32 on a GPU without bf16, else None."""
    if device.type == "cuda" and amp and not cuda_has_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        return (f"note: --amp=true: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                f"has no bf16 arithmetic (8.0 or later needed), so training runs in float32")
    return None


def autocast_for(device, amp, cpu_amp):
    """A no-argument callable returning the forward pass's autocast context (or a null one).

    bf16 autocast where training_precision says bf16 (amp on a GPU with bf16 arithmetic,
    cpu_amp on a CPU with it). Losses and optimiser states stay float32 either way; bf16
    rounds differently, so a run with it does not reproduce a float32 run's numbers.
    """
    if training_precision(device, amp, cpu_amp) == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext
