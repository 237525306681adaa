"""The benchmark (bench/run.py) and full-scene inference: every pixel, bounded memory (issue 5)."""
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import finetune
from bench import busy
from bench import run as bench
from data.loading import Scene
from data.preprocess import standardise
from data.scenes import palette
from models.encoder import PCLEncoder, SmallMapConv2d
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"dim": 8, "depth": 1, "heads": 2, "ffn_ratio": 2, "stem_channels": 2, "resnet_widths": [4, 8],
              "resnet_blocks": [1, 1], "proj_hidden": 8, "proj_dim": 8, "band_proj": 0}


def tiny_scene(h, w, bands, k=3, seed=0):
    cube, gt = bench.synthetic_scene(h, w, bands, k, 0.25, seed)
    return Scene(name="tiny", cube=cube, gt=gt, class_names=[f"c{i}" for i in range(k)], palette=palette(k),
                 rgb_bands=(0, 0, 0))


def test_bench_tiny_writes_json(tmp_path):
    lines = []
    out = tmp_path / "tiny.json"
    path = bench.main(["--dataset=tiny", "--preset=small", "--patch_size=5", "--batch_size=16",
                       "--finetune_batch_size=8", "--inference_batch_size=64", "--steps=2", "--warmup=1",
                       "--threads=1", f"--out={out}"], log=lines.append)
    assert path == out and lines[-1] == str(out)
    result = json.loads(out.read_text())
    for key in ("pretrain_anchors_per_s", "finetune_samples_per_s", "inference_pixels_per_s", "peak_rss_mb",
                "slic_standardise_s", "forward_flops_per_anchor", "pretrain_flops_per_s"):
        assert result[key] > 0, key
    for key in ("data", "forward", "loss", "backward_step"):
        part = result["pretrain"]["parts_s"][key]
        assert 0 < part["min"] <= part["median"] <= part["max"]
    assert result["inference"]["pixels"] == 16 * 16
    assert result["device_name"] and result["torch"] == torch.__version__ and result["threads"] == 1
    assert result["config"]["batch_size"] == 16 and result["form"] == "fast"
    from utils.checkpoint import git_commit
    assert result["commit"] == git_commit()  # which code the figures are of
    # what the timed training ran in: float32 here (pretraining's default amp=true is for GPUs)
    assert result["pretrain"]["precision"] == result["finetune"]["precision"] == "float32"


def test_bench_times_finetuning_steps_inside_one_training_run(tmp_path, monkeypatch):
    calls, steps_seen = [], []

    def spy(model, cutter, index, labels, *args, on_step=None, **kwargs):  # one call, every step reported
        calls.append(len(index))
        def counted():
            steps_seen.append(1)
            on_step()
        return bench_train_classifier(model, cutter, index, labels, *args, on_step=counted, **kwargs)

    bench_train_classifier = bench.train_classifier
    monkeypatch.setattr(bench, "train_classifier", spy)
    lines = []
    path = bench.main(["--dataset=tiny", "--preset=small", "--patch_size=5", "--batch_size=8",
                       "--finetune_batch_size=6", "--steps=3", "--warmup=2", "--busy_steps=0", "--parts=finetune",
                       "--threads=1", f"--out={tmp_path / 'f.json'}"], log=lines.append)
    result = json.loads(path.read_text())
    assert calls == [6 * 5] and len(steps_seen) == 5  # warm-up + timed steps, one optimiser step each
    logged = [line for line in lines if "finetune step" in line]
    assert len(logged) == 5 and all("warm-up" in line for line in logged[:2])
    assert not any("warm-up" in line for line in logged[2:])
    ft = result["finetune"]["seconds_per_step"]
    assert 0 < ft["min"] <= ft["median"] <= ft["max"]


def test_bench_reference_form_and_size_overrides(tmp_path, monkeypatch):
    built = []

    class SpyEncoder(PCLEncoder):  # records the form each encoder the bench builds runs in
        def forward(self, *args, **kwargs):
            built.append(self.global_branch.fast)
            return super().forward(*args, **kwargs)

    fused = []

    class SpyAdam(torch.optim.Adam):  # records whether each optimiser is torch's fused one
        def __init__(self, *args, **kwargs):
            fused.append(bool(kwargs.get("fused")))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(bench, "PCLEncoder", SpyEncoder)
    monkeypatch.setattr(torch.optim, "Adam", SpyAdam)
    path = bench.main(["--dataset=SalinasA", "--height=12", "--width=9", "--bands=5", "--preset=small",
                       "--patch_size=5", "--batch_size=8", "--finetune_batch_size=4", "--steps=1", "--warmup=0",
                       "--busy_steps=1", "--parts=pretrain,finetune", "--reference=true", "--threads=1",
                       f"--out={tmp_path / 'r.json'}"],
                      log=lambda *a: None)
    result = json.loads(path.read_text())
    assert result["scene_shape"] == [12, 9, 5] and result["form"] == "reference"
    assert result["pretrain_anchors_per_s"] > 0 and result["finetune_samples_per_s"] > 0
    assert "inference" not in result
    assert built and not any(built)  # every forward pass ran the reference form
    assert fused == [False] * 3  # pretraining, fine-tuning and its profiled run: torch's default Adam


def test_every_pixel_is_predicted():
    # 13 x 11 pixels, predict_scene chunks of 8 x 4 = 32: the last chunk is partial
    scene = tiny_scene(13, 11, 6)
    torch.manual_seed(0)
    encoder = PCLEncoder(6, 5, "small", **TINY_MODEL)
    prediction, _, predict, _ = bench.scene_map(encoder, scene, standardise(scene.cube), torch.device("cpu"),
                                                batch_size=4)
    assert prediction.shape == (13 * 11,) and (prediction >= 1).all() and (prediction <= 3).all()
    np.testing.assert_array_equal(prediction, predict(np.arange(13 * 11)))
    grid = prediction.reshape(13, 11)
    last_row, last_col = np.arange(12 * 11, 13 * 11), np.arange(10, 13 * 11, 11)
    np.testing.assert_array_equal(grid[-1], predict(last_row))
    np.testing.assert_array_equal(grid[:, -1], predict(last_col))


def test_scene_inference_extracts_features_per_batch(monkeypatch):
    # the map never holds the patches or features of more than one chunk of pixels
    scene = tiny_scene(30, 17, 6)
    torch.manual_seed(0)
    encoder = PCLEncoder(6, 5, "small", **TINY_MODEL)
    calls, rows = [], []
    original = finetune.extract_features

    def spy(enc, cutter, flat_index, batch_size, **kw):
        calls.append(len(flat_index))
        if not hasattr(enc, "_spied"):
            features = enc.features
            enc.features = lambda x, pixel=None: (rows.append(x.shape[0]), features(x, pixel))[1]
            enc._spied = True
        return original(enc, cutter, flat_index, batch_size, **kw)

    monkeypatch.setattr(finetune, "extract_features", spy)
    prediction, _, _, _ = bench.scene_map(encoder, scene, standardise(scene.cube), torch.device("cpu"), batch_size=8)
    assert (prediction >= 1).all()
    labelled = int((scene.gt > 0).sum())
    assert calls[0] == labelled  # Evaluator caches the labelled pixels' features once, for the probe
    assert len(calls) > 1 and max(calls[1:]) <= 8 * 8 and max(rows) <= 8  # then one chunk at a time
    assert sum(rows) <= labelled + 30 * 17


CHILD = """
import resource, sys
import torch
torch.set_num_threads(1)
from bench.run import scene_map, synthetic_scene
from data.loading import Scene
from data.preprocess import standardise
from data.scenes import palette
from models.encoder import PCLEncoder, SmallMapConv2d
torch.manual_seed(0)
encoder = PCLEncoder(32, 7, "small", **{tiny})
for side in (24, 80, 160):
    cube, gt = synthetic_scene(side, side, 32, 3, 0.05, 0)
    scene = Scene("tiny", cube, gt, ["a", "b", "c"], palette(3), (0, 0, 0))
    prediction = scene_map(encoder, scene, standardise(cube), torch.device("cpu"), 256)[0]
    assert (prediction >= 1).all()
    print(side, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)
"""


def test_scene_inference_peak_memory_stays_flat_as_the_scene_grows():
    # 80 x 80 -> 160 x 160 pixels (4x): holding every patch at once would add 25600 x 32 x 7 x 7
    # float32 = 160 MB (and the authors' code did); batched inference adds only the larger cube
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD.replace("{tiny}", repr(TINY_MODEL))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = {int(line.split()[0]): float(line.split()[1]) for line in proc.stdout.split("\n") if line.strip()}
    all_patches_mb = 160 * 160 * 32 * 7 * 7 * 4 / 2 ** 20
    assert peak[160] - peak[80] < 0.3 * all_patches_mb, peak


RELEASE_CHILD = """
import sys
import numpy as np
from utils.device import release_freed_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20
if sys.argv[1] == "1":
    assert release_freed_memory()
big = np.ones(24 << 18, np.float32)
del big                                                   # glibc's mmap threshold rises to 24 MB
blocks = [np.ones(4 << 18, np.float32) for _ in range(50)]  # 50 x 4 MB
before = rss()
del blocks[::2]                                           # free every other block: holes in the heap
print(round(before - rss()))
"""


def last_number_printed(child, flag):
    """Run the script `child` with argument flag under glibc's default malloc settings (no
    MALLOC_* variables); the last number it prints. Skips off glibc."""
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", child, flag], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], env=env, check=True, timeout=120)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_release_freed_memory_returns_freed_blocks_to_the_system():
    freed = {flag: last_number_printed(RELEASE_CHILD, flag) for flag in ("0", "1")}
    assert freed["1"] >= 90          # the 25 freed 4 MB blocks leave RSS
    assert freed["0"] < 50           # glibc's default keeps them resident (what low_memory avoids)


KEEP_CHILD = """
import ctypes
import resource
import sys
from utils.device import keep_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
if sys.argv[1] == "1":
    assert keep_freed_memory()
size = 64 << 20  # 64 MB: above glibc's largest mmap threshold (32 MB)
block = libc.malloc(size)
libc.memset(block, 1, size)
libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size)  # the same size again, every page written
libc.memset(block, 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc only")
def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    faults = {flag: last_number_printed(KEEP_CHILD, flag) for flag in ("0", "1")}
    assert faults["0"] > 8000   # a fresh 64 MB mapping: one fault per 4 KB page touched
    assert faults["1"] < 1000   # the freed block is reused from the heap


def test_flop_count_is_the_models_not_the_fast_forms_overhead():
    """One counted patch must not carry SmallMapConv2d's per-batch matrix construction: the
    fast form's count is the reference form's (up to attention's softmax bookkeeping)."""
    enc = PCLEncoder(30, 15, "paper")  # the last ResNet stage runs on 2 x 2 maps
    cpu = torch.device("cpu")
    fast = bench.forward_flops(enc, 15, 30, cpu)
    reference = bench.forward_flops(copy.deepcopy(enc).set_fast(False), 15, 30, cpu)
    assert abs(fast - reference) / reference < 0.01
    assert all(m.fast for m in enc.modules() if isinstance(m, SmallMapConv2d))  # form restored


@pytest.mark.parametrize("glibc", [True, False])
def test_allocator_policy_keeps_on_cpu_releases_with_low_memory_and_says_when_it_cannot(glibc, monkeypatch):
    from utils import device as dev
    calls = []
    monkeypatch.setattr(dev, "keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr(dev, "release_freed_memory", lambda: calls.append("release") or glibc)
    notes = [dev.set_allocator_policy(torch.device(name), low, keep) for name, low, keep in
             (("cpu", False, True), ("cpu", True, True), ("cuda", False, True), ("cpu", False, False))]
    assert calls == ["keep", "release"]  # kept on CPU; low_memory releases; nothing on CUDA; or glibc's defaults
    assert notes[0] is None and notes[2] is None and notes[3] is None
    assert (notes[1] is None) == glibc and (glibc or "--low_memory" in notes[1])


def test_bench_parts_times_every_part_in_both_forms(tmp_path, monkeypatch):
    from bench import parts
    from models.encoder import GlobalBranch
    forms = []  # the form of every timed or counted pixel-stage pass
    original = GlobalBranch.pixel_stage
    monkeypatch.setattr(GlobalBranch, "pixel_stage", lambda self, x: forms.append(self.fast) or original(self, x))
    lines = []
    result = parts.main(["--preset=small", "--bands=12", "--patch_size=7", "--batch_size=4", "--repeats=1",
                         "--threads=1", f"--out={tmp_path / 'p.json'}"], log=lines.append)
    assert json.loads((tmp_path / "p.json").read_text())["parts"].keys() == set(parts.PART_NAMES)
    rows = result["parts"]
    for name in parts.PART_NAMES:
        for form in ("fast", "reference"):
            assert 0 < rows[name][form]["min_s"] <= rows[name][form]["median_s"]
            assert any(line.lstrip().startswith(name) for line in lines)
    # the parts are the whole encoder but for the small preset's band projection and the z heads' norms
    assert forms.count(True) >= 4 and forms.count(False) >= 4  # both forms ran, warm-up and timed repeat
    pieces = sum(rows[name]["forward_flops_per_patch"] for name in parts.PART_NAMES[:-1])
    whole = rows["whole encoder"]["forward_flops_per_patch"]
    assert 0.9 * whole <= pieces <= whole


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("part", ["pretrain", "finetune"])
def test_bench_fast_form_allocator_setting_is_the_scripts_unless_asked(tmp_path, monkeypatch, keep, part):
    """Set once, before any part: a fine-tuning-only run times finetune.py's setting too (never
    low_memory, which is pretraining's), not glibc's defaults."""
    seen = []
    monkeypatch.setattr(bench, "set_allocator_policy", lambda device, low, keep_freed=True: seen.append(
        (device.type, low, keep_freed)))
    bench.main(["--dataset=tiny", "--preset=small", "--patch_size=5", "--batch_size=8", "--steps=1", "--warmup=0",
                f"--parts={part}", "--threads=1", f"--keep_freed_memory={keep}", "--low_memory=true",
                f"--out={tmp_path / 'k.json'}"], log=lambda *a: None)
    assert seen == [("cpu", part == "pretrain", keep)]


def test_bench_parts_cpu_amp_runs_only_the_fast_form_under_bf16(tmp_path, monkeypatch):
    """--cpu_amp=true: every fast-form pass (the parts' inputs included) under CPU autocast,
    every reference pass in float32; refused on a CPU without bf16 arithmetic."""
    from bench import parts
    from models.encoder import GlobalBranch
    from utils import device as dev
    from utils.errors import UserError
    seen = []  # (form, autocast on) of every pixel-stage pass
    original = GlobalBranch.pixel_stage
    monkeypatch.setattr(GlobalBranch, "pixel_stage", lambda self, x: seen.append(
        (self.fast, torch.is_autocast_enabled("cpu"))) or original(self, x))
    args = ["--preset=small", "--bands=12", "--patch_size=7", "--batch_size=4", "--repeats=1", "--threads=1",
            "--cpu_amp=true"]
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match="--cpu_amp=true"):
        parts.main(args, log=lambda *a: None)
    assert seen == []
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: True)  # torch emulates bf16 where the CPU has none
    count_flops = parts.forward_flops
    monkeypatch.setattr(parts, "forward_flops", lambda *a: (count_flops(*a), seen.append("counted"))[0])
    lines = []
    result = parts.main(args, log=lines.append)
    counted = seen.index("counted")
    assert set(seen[:counted]) == {(True, False)}  # FLOPs are counted in float32, as bench.run counts them
    assert set(seen[counted + 1:]) == {(True, True), (False, False)}  # timed: fast in bf16, reference float32
    assert "bf16" in lines[0] and result["config"]["cpu_amp"] is True


def test_cuda_timing_waits_on_the_benchmarked_gpu(monkeypatch):
    """bench.run's timers synchronise the GPU the run uses (torch.cuda.synchronize() with no
    argument waits on cuda:0 only, so a --device=cuda:1 run would time kernel launches)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    bench.synchronizer(torch.device("cuda", 1))()
    bench.PartTimer(torch.device("cuda", 1)).start()
    assert calls == [torch.device("cuda", 1)] * 2
    bench.synchronizer(torch.device("cpu"))()
    assert len(calls) == 2  # nothing to wait for on the CPU


def test_covered_length_counts_overlaps_once_and_clips_to_the_window():
    assert busy.covered_length([], 0, 10) == 0
    assert busy.covered_length([(1, 3), (2, 5), (7, 8)], 0, 10) == 5     # [1, 5) and [7, 8)
    assert busy.covered_length([(1, 9), (2, 3), (4, 5)], 0, 10) == 8     # nested intervals
    assert busy.covered_length([(-5, 2), (8, 20), (11, 12)], 0, 10) == 4  # clipped at both ends
    assert busy.covered_length([(3, 4), (1, 2)], 0, 10) == 2             # any order
    assert busy.covered_length([(12, 15), (-3, -1)], 0, 10) == 0         # wholly outside


def test_gpu_work_is_kernels_copies_and_memsets_on_the_benchmarked_gpu():
    """The CUDA filter, on events shaped like torch.profiler's: the GPU's mirror of an
    annotation spans the whole window and is no work, nor are host-side runtime calls or
    another GPU's kernels."""
    def event(kind, index, start, end, device_type="cuda"):
        return SimpleNamespace(activity_type=kind, device_index=index, time_range=SimpleNamespace(start=start, end=end),
                               device_type=device_type)
    events = [event("kernel", 1, 0, 2), event("gpu_memcpy", 1, 3, 4), event("gpu_memset", 1, 5, 6),
              event("kernel", 0, 6, 9), event("gpu_user_annotation", 1, 0, 10), event("cuda_runtime", 1, 0, 10),
              event("cpu_op", -1, 0, 10, "cpu")]
    assert busy.work_intervals(events, torch.device("cuda", 1)) == [(0, 2), (3, 4), (5, 6)]
    assert busy.work_intervals(events, torch.device("cpu")) == [(0, 10)]


def test_busy_share_counts_time_inside_torch_operators_on_the_cpu():
    a = torch.randn(512, 512)  # milliseconds per operator, so the Python between them is a small share

    def steps(pause):
        def run():
            for _ in range(5):
                a @ a
            time.sleep(pause)
        return run

    busy_run = busy.busy_share(steps(0.0), torch.device("cpu"))
    idle_run = busy.busy_share(steps(0.2), torch.device("cpu"))
    assert busy_run["work_events"] >= 5 and 0.5 < busy_run["busy_share"] <= 1
    assert idle_run["window_s"] - idle_run["busy_s"] >= 0.19  # the sleep is no work
    assert 0 < idle_run["busy_share"] < busy_run["busy_share"]


def test_bench_reports_the_busy_share_of_unsynchronised_steps(tmp_path, monkeypatch):
    """The profiled window holds --busy_steps steps run as the scripts run them: no part timer
    (which synchronises a GPU at every part) inside pretraining's steps, no per-step callback in
    fine-tuning's."""
    inside, seen = [False], []

    def spy_busy(run, device, sync=lambda: None):
        inside[0] = True
        try:
            return real_busy(run, device, sync)
        finally:
            inside[0] = False

    def spy_step(*args, mark=None, **kwargs):
        seen.append(("pretrain", inside[0], mark is None))
        return real_step(*args, mark=mark, **kwargs)

    def spy_train(*args, on_step=None, **kwargs):
        seen.append(("finetune", inside[0], on_step is None))
        return real_train(*args, on_step=on_step, **kwargs)

    real_busy, real_step, real_train = bench.busy_share, bench.pretrain_main.train_step, bench.train_classifier
    monkeypatch.setattr(bench, "busy_share", spy_busy)
    monkeypatch.setattr(bench.pretrain_main, "train_step", spy_step)
    monkeypatch.setattr(bench, "train_classifier", spy_train)
    path = bench.main(["--dataset=tiny", "--preset=small", "--patch_size=5", "--batch_size=8",
                       "--finetune_batch_size=6", "--steps=1", "--warmup=1", "--busy_steps=2",
                       "--parts=pretrain,finetune", "--threads=1", f"--out={tmp_path / 'b.json'}"], log=print)
    result = json.loads(path.read_text())
    for part in ("pretrain", "finetune"):
        assert 0 < result[part]["busy"]["busy_share"] <= 1 and result[part]["busy"]["work_events"] > 0
    assert seen == [("pretrain", False, False)] * 2 + [("pretrain", True, True)] * 2 \
        + [("finetune", False, False), ("finetune", True, True)]
    with pytest.raises(UserError, match="busy_steps"):
        bench.main(["--dataset=tiny", "--busy_steps=-1", f"--out={tmp_path / 'x.json'}"])


def test_cuda_peak_memory_is_measured_per_part_and_the_runs_is_their_highest(monkeypatch):
    """Each part's CUDA peak starts from a reset, so fine-tuning's is not pretraining's; the
    run's cuda_max_allocated_mb is the highest of them (no GPU needed: torch.cuda is patched)."""
    allocator = {"peak_mb": 300}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocator["peak_mb"] * 2 ** 20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: allocator.update(peak_mb=100))
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert bench.cuda_peak_since_last_call(gpu) == 300
    assert bench.cuda_peak_since_last_call(gpu) == 100  # the first call reset the peak
    assert bench.peak_memory(gpu, [250.0, 120.0])["cuda_max_allocated_mb"] == 250
    allocator["peak_mb"] = 400
    assert bench.peak_memory(gpu, [250.0])["cuda_max_allocated_mb"] == 400  # the part since the last call
    assert bench.cuda_peak_since_last_call(cpu) is None and "cuda_max_allocated_mb" not in bench.peak_memory(cpu)
