"""Speed and memory of pretraining, fine-tuning and full-scene inference (issue 5).

Runs on a seeded synthetic cube of a real scene's size (no data files needed) and the
code paths the scripts use: pretrain_main.train_step, models.classifier.train_classifier,
finetune.Evaluator + finetune.predict_scene. Timings are median / min / max over `steps`
repeats after `warmup` (CUDA is synchronised around each timed part).

    python -m bench.run --dataset=SalinasA --preset=paper --batch_size=256 --steps=3 --threads=2
    python -m bench.run --dataset=SalinasA --preset=paper --reference=true   # literal reference forms
    python -m bench.run --dataset=PaviaU --preset=small --parts=inference     # bounded-memory map

Writes JSON to --out (default bench/results/<dataset>_<preset>_<device>[_reference][_low_memory][_cpu_amp].json)
and prints its path on the last line.
"""
import os
# before torch: its CPU allocator then backs large tensors with transparent huge pages
# (fewer page faults on the paper preset's 376 MB activations; docs/BENCHMARKS.md)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import functools
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# ---------------------------------------------------------------- settings
dataset = "SalinasA"        # a scene of data/scenes.py (its size, synthetic data) | tiny (16 x 16 x 8)
height = 0                  # > 0: override the scene's size
width = 0
bands = 0
classes = 0                 # 0 = the scene's class count
preset = "small"            # encoder preset: paper | small
reference = False           # true: the encoder's literal reference forms (set_fast(False))
low_memory = False          # true: pretraining with PCLEncoder.set_low_memory (recompute in backward)
cpu_amp = False             # true: bf16 autocast on the CPU in pretraining and fine-tuning (as the scripts' --cpu_amp)
keep_freed_memory = True    # fast form: the scripts' utils.device.keep_freed_memory; false: glibc's defaults
patch_size = 15
negatives = "pcl"           # pretraining negatives: all | pcl | nsmm | pcl+nsmm
batch_size = 256            # pretraining anchors per step
finetune_batch_size = 64    # fine-tuning samples per step (finetune.py's default)
inference_batch_size = 512  # finetune.py's --batch_size
steps = 5                   # timed repeats of each step
warmup = 1                  # untimed steps first
busy_steps = 3              # then steps as the scripts run them, under torch.profiler: the busy share; 0 = none
parts = "slic,pretrain,finetune,inference"  # what to measure (comma-separated)
labelled_share = 0.25       # share of the scene's blocks that carry a class label
device = "auto"
threads = 0                 # torch CPU threads; 0 = torch's default
seed = 0
out = ""                    # "" = bench/results/<dataset>_<preset>_<device>[_reference][_low_memory][_cpu_amp].json
# -------------------------------------------------------------------------
SETTINGS = [k for k in list(globals()) if not k.startswith("_") and k[0].islower()
            and isinstance(globals()[k], (bool, int, float, str))]

import finetune                                                       # noqa: E402
from bench.busy import busy_share                                     # noqa: E402
import pretrain_main                                                  # noqa: E402
from data.loading import Scene                                        # noqa: E402
from data.patches import PatchCutter                                  # noqa: E402
from data.preprocess import standardise                               # noqa: E402
from data.pseudolabels import pixel_pseudolabels, superpixel_pseudolabels  # noqa: E402
from data.scenes import SCENES, palette                               # noqa: E402
from data.superpixels import compute_superpixels, cube_fingerprint, slic_params, superpixel_mean_spectra  # noqa: E402
from models.classifier import TwoHeadClassifier, train_classifier     # noqa: E402
from models.encoder import PCLEncoder, PRESETS, SmallMapConv2d, count_parameters  # noqa: E402
from models.negatives import MODES                                    # noqa: E402
from utils.checkpoint import git_commit, save_encoder                 # noqa: E402
from utils.config import format_config, resolve_config                # noqa: E402
from utils.device import (amp_note, autocast_for, check_cpu_amp, fused_adam, host_to_device,  # noqa: E402
                          pick_device, set_allocator_policy, training_precision)
from utils.errors import UserError, run_main                          # noqa: E402
from utils.fileio import write_json                                   # noqa: E402

PARTS = ("slic", "pretrain", "finetune", "inference")
TINY = (16, 16, 8, 3)


def scene_size(config):
    """(H, W, B, K) of the benchmark scene: the named scene's, with any overrides."""
    if config["dataset"] == "tiny":
        h, w, b, k = TINY
    elif config["dataset"] in SCENES:
        info = SCENES[config["dataset"]]
        (h, w, b), k = info.shape, info.n_classes
    else:
        raise UserError(f"--dataset={config['dataset']}: expected tiny or one of {', '.join(SCENES)}")
    h, w, b = config["height"] or h, config["width"] or w, config["bands"] or b
    k = config["classes"] or k
    if min(h, w) < 4 or b < 1 or k < 2:
        raise UserError("--height and --width must be >= 4, --bands >= 1, --classes >= 2")
    return h, w, b, k


def synthetic_scene(h, w, b, k, labelled_share=0.25, seed=0):
    """Seeded scene: smooth random class spectra on a random block map.

    Returns (cube (H, W, B) float32, gt (H, W) int64 with 0 = unlabelled and every class 1..K present).
    """
    rng = np.random.default_rng(seed)
    block = max(2, min(h, w) // 10)
    gh, gw = -(-h // block), -(-w // block)
    blocks = rng.integers(1, k + 1, (gh, gw))
    blocks.ravel()[rng.permutation(gh * gw)[:k]] = np.arange(1, k + 1)[:gh * gw]  # every class appears
    classes = np.repeat(np.repeat(blocks, block, 0), block, 1)[:h, :w]  # (H, W) 1..K
    labelled = np.repeat(np.repeat(rng.random((gh, gw)) < labelled_share, block, 0), block, 1)[:h, :w].copy()
    for c in range(1, k + 1):  # a few labelled pixels in every class
        pixels = np.flatnonzero(classes == c)
        labelled.flat[rng.permutation(pixels)[:4]] = True
    gt = np.where(labelled, classes, 0).astype(np.int64)
    # smooth spectra: random walks smoothed by a moving average, one per class plus a background
    walks = rng.standard_normal((k + 1, b + 8)).cumsum(1)
    spectra = np.stack([np.convolve(row, np.ones(9) / 9, mode="valid") for row in walks])[:, :b]  # (K+1, B)
    spectra = (1000 + 100 * spectra).astype(np.float32)
    cube = spectra[classes]                                              # (H, W, B)
    cube *= rng.uniform(0.9, 1.1, (h, w, 1)).astype(np.float32)         # illumination
    cube += rng.standard_normal((h, w, b), dtype=np.float32) * 5.0
    return cube, gt


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronizer(device):
    """A no-argument callable that waits for `device`'s queued work: torch.cuda.synchronize of
    that device on CUDA (with no argument it would wait on the current device, cuda:0, only),
    nothing on the CPU."""
    if device.type == "cuda":
        return functools.partial(torch.cuda.synchronize, device)
    return lambda: None


def summary(values):
    """median / min / max of a list of numbers."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class PartTimer:
    """Seconds per named part of a step; CUDA is synchronised at each boundary."""

    def __init__(self, device):
        self.sync = synchronizer(device)
        self.parts, self.t = {}, 0.0

    def start(self):
        self.sync()
        self.parts, self.t = {}, time.perf_counter()

    def __call__(self, part):
        self.sync()
        now = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.t
        self.t = now


def counted_flops(encoder, run):
    """FLOPs that run(encoder) performs in eval mode without gradients (FlopCounterMode).

    The model's FLOPs, conventionally counted: SmallMapConv2d counts as the 3x3 conv it
    computes, not as its dense matmul plus the matrix's construction (which a batch of
    patches shares, but one counted patch would carry alone).
    """
    from torch.utils.flop_counter import FlopCounterMode
    was_training = encoder.training
    small_maps = [m for m in encoder.modules() if isinstance(m, SmallMapConv2d)]
    forms = [m.fast for m in small_maps]
    encoder.eval()
    for m in small_maps:
        m.fast = False
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run(encoder)
    finally:
        for m, fast in zip(small_maps, forms):
            m.fast = fast
        encoder.train(was_training)
    return int(counter.get_total_flops())


def forward_flops(encoder, patch_size, n_bands, device):
    """FLOPs of one patch through the encoder's forward."""
    return counted_flops(encoder, lambda e: e(torch.zeros(1, n_bands, patch_size, patch_size, device=device)))


def map_flops(encoder, patch_size, n_bands, device):
    """FLOPs per pixel of the full-scene map's encoder work (fast form): the pixel map once per
    pixel, then the rest of the forward pass on that pixel's patch."""
    x = torch.zeros(1, n_bands, patch_size, patch_size, device=device)
    pixel = torch.zeros(1, encoder.pixel_channels, patch_size, patch_size, device=device)
    return counted_flops(encoder, lambda e: (e.features(x, pixel),
                                             e.pixel_map(torch.zeros(n_bands, 1, 1, device=device))))


def bench_pretrain(config, cutter, spectra_t, pseudo_t, labels_t, device, n_bands, log):
    """Anchors/s of pretrain_main.train_step + backward + Adam, with the split into parts."""
    cfg = {k: getattr(pretrain_main, k) for k in pretrain_main.SETTINGS}
    cfg.update(negatives=config["negatives"], batch_size=config["batch_size"], patch_size=config["patch_size"],
               seed=config["seed"])
    torch.manual_seed(config["seed"])
    model = PCLEncoder(n_bands, config["patch_size"], config["preset"], fast=not config["reference"]).to(device)
    model.set_low_memory(config["low_memory"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                 fused=not config["reference"] and fused_adam(device))
    autocast = autocast_for(device, cfg["amp"], config["cpu_amp"])
    order_gen = torch.Generator().manual_seed(config["seed"])
    view_gen = torch.Generator().manual_seed(config["seed"] + 1)
    mine_gen = torch.Generator().manual_seed(config["seed"] + 2)
    n_pixels = cutter.height * cutter.width
    timer = PartTimer(device)
    model.train()
    records = []
    for step in range(config["warmup"] + config["steps"]):
        batch_index = torch.randint(n_pixels, (config["batch_size"],), generator=order_gen).to(device)
        timer.start()
        loss, _ = pretrain_main.train_step(model, cutter, batch_index, spectra_t, pseudo_t, labels_t, cfg,
                                           view_gen, mine_gen, autocast, mark=timer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        timer("backward_step")
        total = sum(timer.parts.values())
        log(f"  pretrain step {step + 1}: {total:.2f}s ({config['batch_size'] / total:.1f} anchors/s)"
            f"{'  [warm-up]' if step < config['warmup'] else ''}")
        if step >= config["warmup"]:
            records.append(dict(timer.parts, total=total))
    totals = [r["total"] for r in records]
    result = {
        "anchors_per_s": summary([config["batch_size"] / t for t in totals]),
        "seconds_per_step": summary(totals),
        "parts_s": {p: summary([r[p] for r in records]) for p in ("data", "forward", "loss", "backward_step")},
        "loss": float(loss.item()),
    }

    def untimed_steps():
        """As pretrain_main's loop runs them: the batch order copied to the device once, the
        loss and diagnostics summed there, the loss read every REPORT_EVERY steps and at the end."""
        n = config["busy_steps"]
        order = host_to_device(torch.randint(n_pixels, (n, config["batch_size"]), generator=order_gen), device)
        sums = pretrain_main.EpochSums(device)
        for step in range(n):
            loss = pretrain_main.learn_from_batch(model, optimizer, sums, cutter, order[step], spectra_t, pseudo_t,
                                                  labels_t, cfg, view_gen, mine_gen, autocast)
            if pretrain_main.report_due(step, step + 1 == n):
                loss.item()
        sums.means()

    if config["busy_steps"]:
        result["busy"] = busy_share(untimed_steps, device, synchronizer(device))
        log(f"  pretrain: {device.type} busy {result['busy']['busy_share']:.1%} of "
            f"{config['busy_steps']} unsynchronised steps (torch.profiler)")
    return model, result


def bench_finetune(config, encoder, cutter, gt, n_classes, device, log):
    """Samples/s of models.classifier.train_classifier: one call, one epoch over
    (warmup + steps) batches of finetune_batch_size labelled pixels, each step timed from the
    end of the previous one (the first also holds the optimiser's set-up: a warm-up step);
    both branches and heads trainable (the authors' fine-tuning)."""
    model = TwoHeadClassifier(encoder, n_classes).to(device)
    labelled = np.flatnonzero(gt.ravel() > 0)
    rng = np.random.default_rng(config["seed"])
    batch, n_steps = config["finetune_batch_size"], config["warmup"] + config["steps"]
    idx = rng.choice(labelled, batch * n_steps, replace=len(labelled) < batch * n_steps)
    sync = synchronizer(device)
    ends = []

    def on_step():
        sync()
        ends.append(time.perf_counter())
        step = len(ends)
        log(f"  finetune step {step}: {ends[-1] - ends[-2] if step > 1 else ends[-1] - start:.2f}s"
            f"{'  [warm-up]' if step <= config['warmup'] else ''}")

    sync()
    start = time.perf_counter()
    train_classifier(model, cutter, idx, gt.ravel()[idx], epochs=1, batch_size=batch, seed=config["seed"],
                     on_step=on_step, fused=False if config["reference"] else None,  # reference: default Adam
                     autocast=autocast_for(device, finetune.amp, config["cpu_amp"]))
    if len(ends) != n_steps:
        raise RuntimeError(f"fine-tuning ran {len(ends)} steps, expected {n_steps}")
    times = list(np.diff([start] + ends)[config["warmup"]:])
    result = {"samples_per_s": summary([batch / t for t in times]),
              "seconds_per_step": summary(times)}
    if config["busy_steps"]:  # a second, shorter run as finetune.py runs it (its optimiser's set-up included)
        n_more = batch * config["busy_steps"]
        more = rng.choice(labelled, n_more, replace=len(labelled) < n_more)
        result["busy"] = busy_share(lambda: train_classifier(
            model, cutter, more, gt.ravel()[more], epochs=1, batch_size=batch, seed=config["seed"],
            fused=False if config["reference"] else None,
            autocast=autocast_for(device, finetune.amp, config["cpu_amp"])), device, sync)
        log(f"  finetune: {device.type} busy {result['busy']['busy_share']:.1%} of "
            f"{config['busy_steps']} unsynchronised steps (torch.profiler)")
    return result


def scene_map(encoder, scene, cube_std, device, batch_size=512, seed=0, fast=True):
    """Full-scene map the way finetune.py makes it: Evaluator with the linear protocol (frozen
    features + logistic regression on 15 labelled pixels per class), then predict_scene.

    Returns (prediction (H*W,) labels 1..K, Evaluator, predict, seconds): the seconds of
    predict_scene plus those of the Evaluator's pixel map (the per-pixel stage of the whole
    scene, made once); fast=False uses neither the fast forms nor the pixel map.
    """
    cfg = {k: getattr(finetune, k) for k in finetune.SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "encoder.safetensors"
        save_encoder(path, encoder.cpu(), {"dataset": scene.name, "n_bands": scene.n_bands,
                                           "scene_fingerprint": cube_fingerprint(scene.cube)})
        encoder.to(device)
        cfg.update(weights=str(path), protocol="linear", batch_size=batch_size, dataset=scene.name)
        evaluator = finetune.Evaluator(cfg, scene, cube_std, device)
    evaluator.encoder.set_fast(fast)
    pixel_seconds = evaluator.pixel_map_seconds
    if not fast:
        evaluator.pixels, pixel_seconds = None, 0.0
    gt = scene.gt.ravel()
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.permutation(np.flatnonzero(gt == c))[:15] for c in range(1, scene.n_classes + 1)])
    predict = evaluator.fit(train, gt[train], seed)
    sync = synchronizer(device)
    sync()
    t0 = time.perf_counter()
    prediction = finetune.predict_scene(predict, gt.size, batch_size)
    sync()
    return prediction, evaluator, predict, time.perf_counter() - t0 + pixel_seconds


def bench_inference(config, scene, cube_std, encoder, device, log):
    """Pixels/s of the full-scene map (scene_map) over every pixel."""
    t0 = time.perf_counter()
    prediction, _, _, seconds = scene_map(encoder, scene, cube_std, device, config["inference_batch_size"],
                                          config["seed"], fast=not config["reference"])
    setup_seconds = time.perf_counter() - t0 - seconds
    if (prediction < 1).any():
        raise RuntimeError("predict_scene left pixels without a prediction")
    n = prediction.size
    log(f"  inference: {n} pixels in {seconds:.1f}s ({n / seconds:.1f} pixels/s)")
    return {"pixels": int(n), "seconds": seconds, "pixels_per_s": n / seconds,
            "setup_seconds": setup_seconds, "labelled_pixels": int((scene.gt > 0).sum())}


def cuda_peak_since_last_call(device):
    """CUDA: the peak memory allocated on `device` (MB) since the last call, which then resets
    that peak (tensors alive at the reset count from their level); None off CUDA."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def peak_memory(device, cuda_peaks_mb=()):
    """The process's peak RSS (MB) and, on CUDA, the highest of the parts' CUDA peaks."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    peak = {"peak_rss_mb": rss_kb / 1024}
    if device.type == "cuda":
        peak["cuda_max_allocated_mb"] = max([*cuda_peaks_mb, cuda_peak_since_last_call(device)])
    return peak


def main(argv, log=print):
    config = resolve_config({k: globals()[k] for k in SETTINGS}, argv,
                            choices={"preset": tuple(PRESETS), "negatives": MODES})
    wanted = [p.strip() for p in config["parts"].split(",") if p.strip()]
    if not wanted or set(wanted) - set(PARTS):
        raise UserError(f"--parts={config['parts']}: expected a comma-separated subset of {','.join(PARTS)}")
    if (config["steps"] < 1 or config["warmup"] < 0 or config["busy_steps"] < 0 or config["batch_size"] < 2
            or config["finetune_batch_size"] < 2):
        raise UserError("--steps must be >= 1, --warmup and --busy_steps >= 0, and the batch sizes >= 2")
    if config["patch_size"] < 5 or config["patch_size"] % 2 == 0:
        raise UserError(f"--patch_size={config['patch_size']}: expected an odd number >= 5")
    if config["threads"] > 0:
        torch.set_num_threads(config["threads"])
    device = pick_device(config["device"])
    check_cpu_amp(device, config["cpu_amp"])  # before any work
    h, w, b, k = scene_size(config)
    name = device_name(device)
    log(f"bench.run  device {device} ({name})  torch {torch.__version__}  threads {torch.get_num_threads()}")
    log(format_config(config))
    note = amp_note(device, pretrain_main.amp)  # a GPU without bf16: the timed training runs float32
    if note:
        log(note)

    cube, gt = synthetic_scene(h, w, b, k, config["labelled_share"], config["seed"])
    scene_name = config["dataset"] if config["dataset"] in SCENES else "tiny"
    scene = Scene(name=scene_name, cube=cube, gt=gt, class_names=[f"class {c}" for c in range(1, k + 1)],
                  palette=palette(k), rgb_bands=(0, 0, 0))
    log(f"synthetic {scene_name}-size scene: {h} x {w} pixels, {b} bands, {k} classes, "
        f"{int((gt > 0).sum())} labelled")
    result = {"dataset": config["dataset"], "scene_shape": [h, w, b], "n_classes": k, "preset": config["preset"],
              "form": "reference" if config["reference"] else "fast", "device": str(device), "device_name": name,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
              "commit": git_commit(),
              "config": config}

    t0 = time.perf_counter()
    cube_std = standardise(cube)
    result["standardise_s"] = time.perf_counter() - t0
    spectra_t = pseudo_t = None
    if "slic" in wanted or "pretrain" in wanted:
        t0 = time.perf_counter()
        superpixels = compute_superpixels(cube_std, slic_params(cube_std.shape))
        spectra = superpixel_mean_spectra(cube_std, superpixels)          # (S, B)
        result["slic_s"] = time.perf_counter() - t0
        result["slic_standardise_s"] = result["slic_s"] + result["standardise_s"]
        result["superpixels"] = int(spectra.shape[0])
        log(f"  standardise + SLIC: {result['slic_standardise_s']:.2f}s ({spectra.shape[0]} superpixels)")
        pseudo = np.zeros((h, w), dtype=np.int64)
        if "nsmm" in config["negatives"]:
            pseudo = pixel_pseudolabels(superpixels, superpixel_pseudolabels(spectra, k, 30, config["seed"]))
        spectra_t = torch.from_numpy(spectra[superpixels.ravel()]).to(device)  # (H*W, B)
        pseudo_t = torch.from_numpy(pseudo.ravel()).to(device)
    cutter = PatchCutter(cube_std, config["patch_size"], device)
    labels_t = torch.from_numpy(gt.ravel()).to(device)

    torch.manual_seed(config["seed"])
    encoder = PCLEncoder(b, config["patch_size"], config["preset"], fast=not config["reference"]).to(device)
    result["parameters"] = count_parameters(encoder)
    flops = forward_flops(encoder, config["patch_size"], b, device)
    result["forward_flops_per_anchor"] = flops
    log(f"  encoder: {result['parameters'] / 1e6:.2f}M parameters, {flops / 1e9:.3f} GFLOP forward per patch")

    if not config["reference"]:  # as the scripts (finetune.py: never low_memory); the reference form keeps glibc's defaults
        set_allocator_policy(device, config["low_memory"] and "pretrain" in wanted, config["keep_freed_memory"])
    cuda_peaks = [cuda_peak_since_last_call(device)]  # set-up; then each part's own peak

    def record_cuda_peak(part):
        peak = cuda_peak_since_last_call(device)
        if peak is not None:
            part["cuda_max_allocated_mb"] = peak
            cuda_peaks.append(peak)

    if "pretrain" in wanted:
        if config["batch_size"] > h * w:
            raise UserError(f"--batch_size={config['batch_size']} exceeds the scene's {h * w} pixels")
        encoder, pre = bench_pretrain(config, cutter, spectra_t, pseudo_t, labels_t, device, b, log)
        pre["precision"] = training_precision(device, pretrain_main.amp, config["cpu_amp"])
        record_cuda_peak(pre)
        result["pretrain"] = pre
        result["pretrain_anchors_per_s"] = pre["anchors_per_s"]["median"]
        # backward ~ 2 x forward; two views of every anchor
        result["pretrain_flops_per_s"] = 3 * flops * 2 * result["pretrain_anchors_per_s"]
    if "finetune" in wanted:
        ft = bench_finetune(config, encoder, cutter, gt, k, device, log)
        ft["precision"] = training_precision(device, finetune.amp, config["cpu_amp"])
        record_cuda_peak(ft)
        result["finetune"] = ft
        result["finetune_samples_per_s"] = ft["samples_per_s"]["median"]
        result["finetune_flops_per_s"] = 3 * flops * result["finetune_samples_per_s"]
    if "inference" in wanted:
        inf = bench_inference(config, scene, cube_std, encoder, device, log)
        record_cuda_peak(inf)
        result["inference"] = inf
        result["inference_pixels_per_s"] = inf["pixels_per_s"]
        per_pixel = flops if config["reference"] else map_flops(encoder, config["patch_size"], b, device)
        result["inference_flops_per_pixel"] = per_pixel
        result["inference_flops_per_s"] = per_pixel * inf["pixels_per_s"]
    result.update(peak_memory(device, [p for p in cuda_peaks if p is not None]))
    log(f"  peak RSS {result['peak_rss_mb']:.0f} MB"
        + (f", CUDA max allocated {result['cuda_max_allocated_mb']:.0f} MB" if device.type == "cuda" else ""))

    suffix = ("_reference" if config["reference"] else "") + ("_low_memory" if config["low_memory"] else "") \
        + ("_cpu_amp" if config["cpu_amp"] else "")
    path = Path(config["out"] or Path("bench") / "results" /
                f"{config['dataset']}_{config['preset']}_{device.type}{suffix}.json")
    write_json(path, result)
    log(str(path))
    return path


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
