"""How much of a run of training steps the device spends executing work (torch.profiler).

The issue's GPU goal asks for the share of step time the GPU is busy. bench.run's part timer
synchronises at every part boundary, so it cannot say that: here a few steps run as the
scripts run them (no synchronisation inside the window) under torch.profiler, and

    busy share = length of the union of the device's work intervals in the window / window length.

- CUDA: the work is the kernels, memory copies and memsets on the benchmarked GPU (all
  streams; overlapping intervals count once). What is left is the GPU waiting for the host:
  Python, kernel launches, host synchronisations.
- CPU: the work is the time inside torch operators (`cpu_op` events, nested ones counted
  once), so what is left is the Python between them.

The profiler itself adds host work for every operator it records, so on a GPU the share may
err low, most where kernels are short (on the CPU its cost was within the run-to-run spread:
docs/BENCHMARKS.md, session 9).
"""
import torch
from torch.profiler import ProfilerActivity, profile, record_function

WINDOW = "bench.busy_window"
CUDA_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # kineto activity types of GPU work
CPU_WORK = ("cpu_op",)


def covered_length(intervals, start, end):
    """Length of the union of `intervals`, each (start, end), clipped to [start, end]."""
    clipped = sorted((max(a, start), min(b, end)) for a, b in intervals if min(b, end) > max(a, start))
    total, reach = 0.0, start
    for a, b in clipped:
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def work_intervals(events, device):
    """(start, end) microseconds of the profiled `events` that are work on `device`.

    events: torch.profiler FunctionEvents (anything with activity_type, device_type,
    device_index and time_range). CUDA: kernels, copies and memsets on device.index (the
    GPU's mirror of annotations, `gpu_user_annotation`, spans whole ranges and is no work);
    CPU: torch operators.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        chosen = [e for e in events if e.activity_type in CUDA_WORK and e.device_index == index]
    else:
        chosen = [e for e in events if e.activity_type in CPU_WORK]
    return [(e.time_range.start, e.time_range.end) for e in chosen]


def busy_share(run, device, sync=lambda: None):
    """Profile run() and return how much of its wall time `device` was executing work.

    run: a no-argument callable (e.g. a few training steps, no synchronisation inside);
    sync: waits for the device's queued work (bench.run.synchronizer), called before the
    window opens and before it closes, so the window holds exactly run()'s work.
    Returns {"busy_share": float in [0, 1], "window_s", "busy_s", "work_events": int}.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync()
    with profile(activities=activities) as prof:
        with record_function(WINDOW):
            run()
            sync()
    events = prof.events()
    windows = [e for e in events if e.name == WINDOW and e.activity_type != "gpu_user_annotation"]
    if len(windows) != 1:
        raise RuntimeError(f"the profile holds {len(windows)} {WINDOW} ranges, expected 1")
    start, end = windows[0].time_range.start, windows[0].time_range.end
    intervals = work_intervals(events, device)
    busy = covered_length(intervals, start, end)
    return {"busy_share": busy / (end - start), "window_s": (end - start) / 1e6, "busy_s": busy / 1e6,
            "work_events": len(intervals)}

