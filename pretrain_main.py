"""Contrastive pretraining of the two-branch CNN + transformer encoder on one HSI scene.

Recipe: load the scene -> standardise each band -> SLIC superpixels and their mean
spectra -> (NSMM) pseudolabels -> train both branches with the weighted NT-Xent loss
-> save weights/<dataset>/<out_name>.safetensors (config in its metadata).
Ground-truth labels are read only for the false-negative diagnostic, never for training.

Edit the settings below, or override any of them: python pretrain_main.py --epochs=20
Several processes (DistributedDataParallel, one GPU each, or gloo on CPU):
    torchrun --nproc_per_node=K pretrain_main.py --batch_size=256   (batch_size: the global batch)
"""
import os
# before torch: its CPU allocator then backs large tensors with transparent huge pages
# (fewer page faults on the paper preset's 376 MB activations; docs/BENCHMARKS.md)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

# ---------------------------------------------------------------- settings
# scene
dataset = "SalinasA"        # IndianPines | PaviaU | Salinas | SalinasA | IndianPinesSubset | custom
data_dir = ""               # "" = $HSI_DATA_DIR, else ./datasets
download = True             # fetch missing scene files (SHA-256 checked)
cube = ""                   # custom scene: PATH[:KEY] of the (H, W, B) cube
gt = ""                     # custom scene: PATH[:KEY] of the (H, W) labels, 0 = unlabelled
class_names = ""            # custom scene: JSON file with a list of class names
layout = "auto"             # custom scene: HWB | BHW | auto
# model
preset = "small"            # paper (the authors' sizes) | small (trains on a laptop CPU)
patch_size = 15             # odd; patches are reflect-padded at the border
# contrastive objective
negatives = "pcl"           # all (SimCLR) | pcl | nsmm | pcl+nsmm
weighting = ""              # shorthand of the first paper: pcl = negatives=pcl, none = negatives=all
temperature = 0.5
pcl_a = 0.75                # PCL weight a ** ((m_ij - mu_j) / b)
pcl_b = 0.25
n_hard = 64                 # NSMM: hardest negatives kept per anchor (after elimination)
n_easy = 64                 # NSMM: uniformly drawn other negatives kept per anchor
pseudo_k = 0                # NSMM: k-means clusters; 0 = the scene's class count
pseudo_pca = 30             # NSMM: PCA components before k-means
# superpixels (SLIC over the standardised cube)
slic_pixels_per_segment = 200
slic_compactness = 1.0
slic_sigma = 1.0
slic_max_iter = 20
# views
crop_min = 0.9              # crop side in [crop_min, 1] of the patch, resized back
jitter_p = 0.8              # probability of the brightness/contrast jitter
jitter_contrast = 0.2       # alpha in [1 - c, 1 + c]
jitter_shift = 0.1          # beta in [-s, s] (bands are standardised)
# optimisation
pretrain_pool = "all"       # anchors: all pixels | exclude_test: no labelled pixel is an anchor
                            # (labelled spectra still appear in nearby patches and in SLIC)
epochs = 5                  # quick start; the paper protocol: --preset=paper --epochs=400 --lr=1e-4
batch_size = 256
lr = 1e-3                   # the authors used 1e-4 for 400 epochs
weight_decay = 5e-4
seed = 0
device = "auto"             # auto = CUDA when present, else CPU
amp = True                  # bf16 autocast on CUDA GPUs with bf16 arithmetic (compute capability 8.0+);
                            # older GPUs and the CPU run float32
cpu_amp = False             # bf16 autocast on the CPU too: only CPUs with bf16 arithmetic (AVX512-BF16 or
                            # AMX); 1.2x to 1.9x faster paper-preset steps than float32 there, rounds
                            # differently from float32 (docs/BENCHMARKS.md)
threads = 0                 # CPU threads for torch; 0 = torch's default
low_memory = False          # recompute activations in backward: same numbers, about a third of the peak
                            # memory of --preset=paper on CPU, about half the speed (docs/BENCHMARKS.md)
# output
out_name = ""               # weights/<dataset>/<out_name>.safetensors; "" = encoder
run_dir = ""                # checkpoints and logs; "" = runs/<dataset>/<out_name>
cache_dir = "runs/cache"    # SLIC and pseudolabel cache
resume = True               # continue from run_dir/checkpoint.pt when present
max_steps = 0               # stop after this many steps in total (0 = no limit; for tests); a cut-short
                            # epoch is logged with its step count and never checkpointed
# -------------------------------------------------------------------------
SETTINGS = [k for k in list(globals()) if not k.startswith("_") and k[0].islower()
            and isinstance(globals()[k], (bool, int, float, str))]

from data import check_data_dir, check_scene_args, load_scene               # noqa: E402
from data.patches import PatchCutter, apply_views, draw_view_params   # noqa: E402
from data.preprocess import standardise                               # noqa: E402
from data.pseudolabels import cached_superpixel_pseudolabels, pixel_pseudolabels, purity  # noqa: E402
from data.superpixels import cached_superpixels, cube_fingerprint, slic_params, superpixel_mean_spectra  # noqa: E402
from models.encoder import PCLEncoder, PRESETS, count_parameters, describe  # noqa: E402
from models.losses import false_negative_share, similarity_logits, weighted_nt_xent  # noqa: E402
from models.negatives import MODES, batch_pcl_weights, negative_weights  # noqa: E402
from utils.checkpoint import git_commit, load_checkpoint, save_checkpoint, save_encoder  # noqa: E402
from utils import distributed                                         # noqa: E402
from utils.config import check_ranges, format_config, resolve_config  # noqa: E402
from utils.device import (amp_note, autocast_for, check_cpu_amp, fused_adam, host_to_device, pick_device,  # noqa: E402
                          set_allocator_policy, training_precision)
from utils.errors import UserError, run_main                          # noqa: E402
from utils.fileio import atomic_path, check_output_dir, write_json, write_text  # noqa: E402


def resolve_negatives(config):
    """Fold the `weighting` shorthand into `negatives`."""
    if config["weighting"]:
        implied = {"pcl": "pcl", "none": "all"}.get(config["weighting"])
        if implied is None:
            raise UserError(f"--weighting={config['weighting']}: expected pcl or none")
        config["negatives"] = implied
    return config


def pretraining_pool(gt, pool):
    """Flat pixel indices pretraining draws from: every pixel, or only the unlabelled ones."""
    if pool == "all":
        return np.arange(gt.size)
    return np.flatnonzero(gt.ravel() == 0)


def save_pseudolabel_map(path, labels):
    """PNG of the pseudolabel map (H, W), one colour per cluster, for inspection."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scale = max(1, 256 // min(labels.shape))  # nearest-neighbour upscale: small scenes stay readable
    big = np.repeat(np.repeat(labels, scale, axis=0), scale, axis=1)
    with atomic_path(path) as tmp:
        plt.imsave(tmp, big, cmap="tab20", format="png")


# Settings that may differ between a run and its resumption: they change where things go,
# how long to train or how fast (amp and cpu_amp: and how finely it rounds), not what an epoch
# computes. utils.table is stricter: it keeps encoders made in bf16 and float32 apart.
RESUME_FREE = ("weighting", "epochs", "max_steps", "resume", "threads", "device", "amp", "cpu_amp", "low_memory",
               "out_name", "run_dir", "cache_dir", "data_dir", "download", "cube", "gt", "class_names", "layout")


def resume_from(path, model, optimizer, config, bands, fingerprint):
    """Load run_dir/checkpoint.pt into `model` and `optimizer`; returns (epochs done, log).

    Refused (UserError naming the file) when it is unreadable or crafted, or was written
    for another scene, band count or training setting (only RESUME_FREE may change).
    """
    state = load_checkpoint(path)
    advice = "pass the same settings, --resume=false to start over, or another --out_name"
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "config", "log"} <= set(state):
        raise UserError(f"{path}: not a checkpoint of pretrain_main.py (no model/optimizer/epoch); {advice}")
    old = state["config"] if isinstance(state["config"], dict) else {}
    if state.get("n_bands") != bands or state.get("scene_fingerprint", fingerprint) != fingerprint:
        raise UserError(f"{path}: checkpoint of another scene ({state.get('n_bands')} bands, data "
                        f"{state.get('scene_fingerprint')}; this run: {bands} bands, data {fingerprint}); {advice}")
    changed = [f"--{k} was {old.get(k)!r}, now {config[k]!r}" for k in config
               if k not in RESUME_FREE and old.get(k) != config[k]]
    if changed:
        raise UserError(f"{path}: checkpoint written with other settings ({'; '.join(changed[:4])}); {advice}")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, log = int(state["epoch"]), json.loads(state["log"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        detail = " ".join(str(err).split())[:200]
        raise UserError(f"{path}: checkpoint does not fit this model ({type(err).__name__}: {detail}); "
                        f"{advice}") from None
    if not isinstance(log, list) or len(log) != epoch or epoch < 0:
        raise UserError(f"{path}: inconsistent checkpoint (epoch {epoch}, {len(log) if isinstance(log, list) else '?'} "
                        f"log records); {advice}")
    if epoch > config["epochs"]:
        raise UserError(f"{path}: checkpoint has {epoch} epochs done, more than --epochs={config['epochs']}; "
                        f"pass --epochs >= {epoch}, --resume=false to start over, or another --out_name")
    return epoch, log


def one_cluster_error(config, scene_name, n_superpixels):
    """The UserError for NSMM when every pixel would get one pseudolabel (it would eliminate
    every negative: a loss of 0, nothing trained)."""
    return UserError(f"--negatives={config['negatives']}: every pixel of {scene_name} gets one pseudolabel (SLIC made "
                     f"{n_superpixels} superpixel(s), which form 1 cluster), so NSMM would eliminate every negative "
                     f"and nothing would train; pass a smaller --slic_pixels_per_segment (now "
                     f"{config['slic_pixels_per_segment']}) or --negatives=pcl")


class EpochSums:
    """Sums over an epoch's steps of the loss and the diagnostics (0-dim tensors), kept on the
    device as one (3,) tensor: adding a step's reads nothing back to the host, so a GPU step
    need not finish before the host queues the next. nan values (a diagnostic with no labelled
    pair) are skipped. In float64, added in step order: the same means, bit for bit, as summing
    Python floats."""

    KEYS = ("loss", "fn_share_global", "fn_share_local")

    def __init__(self, device):
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(self.KEYS), dtype=torch.int64, device=device)

    def add(self, values):
        """values: {key: 0-dim tensor} for every key of KEYS."""
        v = torch.stack([values[k].detach().double() for k in self.KEYS])  # (3,)
        present = ~torch.isnan(v)
        self.sums += torch.where(present, v, 0.0)
        self.counts += present

    def means(self, world=1):
        """{key: mean over the steps (float), or None if every value was nan}. With world > 1
        every rank joins one all-reduce of the loss's sum and count (each rank's loss is its
        own anchors' mean), so the loss is the mean over ranks and steps; the diagnostics are
        the global batch's on every rank already."""
        sums, counts = self.sums.tolist(), self.counts.tolist()
        if world > 1:  # on every rank, whatever its count: no rank may skip a collective
            sums[0], counts[0] = distributed.mean_over_ranks([sums[0], counts[0]], world)
        return {k: s / c if c else None for k, s, c in zip(self.KEYS, sums, counts)}


REPORT_EVERY = 10  # steps between the host's reads of the loss (progress bar, the ranks' stop vote)


def report_due(step, last):
    """Whether the host reads the loss after 0-based `step` (every REPORT_EVERY steps, and the last)."""
    return (step + 1) % REPORT_EVERY == 0 or last


def learn_from_batch(net, optimizer, sums, *step_args, **step_kwargs):
    """One optimisation step: train_step(net, *step_args, **step_kwargs), backward, the
    optimiser's step; the loss and diagnostics go into `sums` (EpochSums) on the device.
    Returns the loss tensor, unread. pretrain_main's loop, and bench.run's profiled steps."""
    loss, diag = train_step(net, *step_args, **step_kwargs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    sums.add({"loss": loss, **diag})
    return loss


class Stop:
    """SIGTERM and Ctrl-C set a flag; the loop saves nothing half-done and exits cleanly."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True


def train_step(model, cutter, batch_index, spectra_t, pseudo_t, labels_t, config, view_gen, mine_gen, autocast,
               rank=0, world=1, mark=None):
    """One contrastive step: two views, both branches, one weighted NT-Xent loss each.

    batch_index: (N,) flat pixel indices of the global batch. With world > 1 (DDP) this
    rank cuts and encodes only its slice of N / world samples; the embeddings are gathered
    with their gradient, so every anchor meets the negatives of the whole batch, and the
    loss is the mean over this rank's anchors (rows of its samples in both views): DDP's
    gradient average is then the gradient of the global mean loss. The view and mining
    random numbers are drawn for the global batch on every rank, and the NSMM mask is
    built from the gathered similarities, so the step is the single-process one (up to
    BatchNorm statistics, which are per rank unless the model uses SyncBatchNorm).
    mark: optional callable(part) called after the "data", "forward" and "loss" parts (timing).
    Returns (loss tensor of this rank's anchors, diagnostics of the global batch as 0-dim
    tensors). Nothing here reads a value back to the host, so on a GPU the host can queue the
    next step while this one runs.
    """
    mark = mark or (lambda part: None)
    n = batch_index.shape[0]
    per = n // world
    own = slice(rank * per, (rank + 1) * per)
    x = cutter(batch_index[own])                                         # (N/W, B, P, P)
    view_args = (config["crop_min"], config["jitter_p"], config["jitter_contrast"], config["jitter_shift"])
    u1, u2 = (host_to_device(draw_view_params(n, view_gen)[own], x.device) for _ in range(2))  # (N/W, 6) each
    views = torch.cat([apply_views(x, u1, *view_args), apply_views(x, u2, *view_args)])  # (2N/W, B, P, P)
    mark("data")
    with autocast():
        out = model(views)
    mark("forward")
    anchors = None
    if world > 1:
        mine = torch.arange(own.start, own.stop, device=views.device)  # made there: no copy to wait for
        anchors = torch.cat([mine, mine + n])                            # (2N/W,) rows in the (2N, 2N) loss
    pcl = batch_pcl_weights(config["negatives"], spectra_t[batch_index], config["pcl_a"], config["pcl_b"])
    pseudolabels, labels = pseudo_t[batch_index], labels_t[batch_index]  # (N,) each
    loss, diag = 0.0, {}
    for branch in ("global_z", "local_z"):
        z = out[branch].float()
        z1 = distributed.gather_rows(z[:per], world)                     # (N, D), the global batch
        z2 = distributed.gather_rows(z[per:], world)                     # (N, D)
        with torch.no_grad():  # (2N, 2N), once: NSMM's mining and the false-negative diagnostic
            logits = similarity_logits(z1.detach(), z2.detach(), config["temperature"])
        weights = negative_weights(config["negatives"], pcl, pseudolabels, logits,
                                   config["n_hard"], config["n_easy"], mine_gen)
        loss = loss + weighted_nt_xent(z1, z2, weights, config["temperature"], anchors)
        diag[f"fn_share_{branch[:-2]}"] = false_negative_share(logits, weights, labels)
    mark("loss")
    return loss, diag


POSITIVE, NON_NEGATIVE = (lambda v: v > 0, "a number > 0"), (lambda v: v >= 0, "a number >= 0")
SHARE = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
RANGES = {  # settings whose values outside these ranges would give NaN losses or a traceback
    "patch_size": (lambda v: v >= 5 and v % 2 == 1, "an odd number >= 5"),
    "temperature": POSITIVE, "pcl_a": POSITIVE, "pcl_b": POSITIVE,
    "n_hard": NON_NEGATIVE, "n_easy": NON_NEGATIVE,
    "pseudo_k": (lambda v: v == 0 or v >= 2, "0 (the class count) or an integer >= 2: one cluster would "
                 "let NSMM eliminate every negative"),
    "pseudo_pca": (lambda v: v >= 1, "an integer >= 1"),
    "slic_pixels_per_segment": (lambda v: v >= 1, "an integer >= 1"),
    "slic_compactness": POSITIVE, "slic_sigma": NON_NEGATIVE,
    "slic_max_iter": (lambda v: v >= 1, "an integer >= 1"),
    "crop_min": (lambda v: 0 < v <= 1, "a number in (0, 1]"), "jitter_p": SHARE,
    "jitter_contrast": (lambda v: 0 <= v < 1, "a number in [0, 1)"), "jitter_shift": NON_NEGATIVE,
    "epochs": (lambda v: v >= 1, "an integer >= 1"), "batch_size": (lambda v: v >= 2, "an integer >= 2"),
    "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "seed": NON_NEGATIVE, "threads": NON_NEGATIVE,
    "max_steps": NON_NEGATIVE,
}


CHOICES = {"negatives": MODES, "preset": tuple(PRESETS), "pretrain_pool": ("all", "exclude_test")}


def checked_config(argv):
    """The run's settings: the defaults above with `argv` applied, every value checked (one-line
    UserError), the dataset's proper name. Reads no file (utils.table checks with it too)."""
    config = resolve_config({k: globals()[k] for k in SETTINGS}, argv, choices=CHOICES)
    if config["weighting"] and "negatives" in {a[2:].split("=")[0].replace("-", "_") for a in argv}:
        raise UserError("give --weighting (the first paper's shorthand) or --negatives, not both")
    config = resolve_negatives(config)
    check_ranges(config, RANGES)
    # "salinasa" -> "SalinasA" (one folder per scene); a custom scene names its files
    config["dataset"] = check_scene_args(config["dataset"], config["cube"], config["gt"], config["class_names"])
    if "nsmm" in config["negatives"] and config["n_hard"] + config["n_easy"] < 1:  # else a zero loss
        raise UserError(f"--negatives={config['negatives']} keeps n_hard + n_easy negatives per anchor; "
                        f"--n_hard={config['n_hard']} --n_easy={config['n_easy']} keeps none: pass --n_hard "
                        f"and/or --n_easy >= 1 (defaults {n_hard} and {n_easy})")
    return config


def main(argv):
    config = checked_config(argv)
    out_name = config["out_name"] or "encoder"
    weights_path = Path("weights") / config["dataset"] / f"{out_name}.safetensors"
    run_dir = Path(config["run_dir"] or Path("runs") / config["dataset"] / out_name)
    check_data_dir(config["data_dir"], config["dataset"])  # a mistyped folder is refused, not created
    check_output_dir(weights_path.parent, "the weights folder")  # every output folder, before any work
    check_output_dir(run_dir, f"--run_dir={config['run_dir']}" if config["run_dir"] else f"the run folder {run_dir}")
    check_output_dir(config["cache_dir"], f"--cache_dir={config['cache_dir']}")
    if config["threads"] > 0:
        torch.set_num_threads(config["threads"])
    _, _, world = distributed.world_from_env()
    if config["batch_size"] % world:
        raise UserError(f"--batch_size={config['batch_size']} does not divide by the {world} processes: each "
                        f"process takes an equal slice of the global batch; pass a multiple of {world}")
    if config["batch_size"] // world < 2:
        raise UserError(f"--batch_size={config['batch_size']} over {world} processes leaves one anchor per process; "
                        f"BatchNorm needs two: pass at least {2 * world}")
    device = pick_device(config["device"])
    check_cpu_amp(device, config["cpu_amp"])  # before any work, and before joining the other processes
    rank, world, device = distributed.setup(device)
    autocast = autocast_for(device, config["amp"], config["cpu_amp"])
    precision = training_precision(device, config["amp"], config["cpu_amp"])  # what runs, recorded with the weights
    say = print if rank == 0 else (lambda *args, **kwargs: None)  # only rank 0 reports
    say(f"pretrain_main.py  commit {git_commit()}  device {device} ({precision})  torch {torch.__version__}")
    say(format_config(config))
    note = amp_note(device, config["amp"])
    if note:
        say(note)

    # 1. scene, standardised once per scene (finetune.py applies the same function)
    with distributed.rank0_first(world):  # one download, then the other ranks read the files
        scene = load_scene(config["dataset"], config["data_dir"], config["download"], config["cube"],
                           config["gt"], config["class_names"], config["layout"])
    cube_std = standardise(scene.cube)                                   # (H, W, B)
    h, w, bands = cube_std.shape
    say(f"scene {scene.name}: {h} x {w} pixels, {bands} bands, {scene.n_classes} classes, "
        f"{int((scene.gt > 0).sum())} labelled")

    # 2. superpixels, their mean spectra, pseudolabels
    t0 = time.time()
    params = slic_params(cube_std.shape, config["slic_pixels_per_segment"], config["slic_compactness"],
                         config["slic_sigma"], config["slic_max_iter"])
    with distributed.rank0_first(world):  # rank 0 computes and caches SLIC, the others read the cache
        superpixels, cache_path, hit = cached_superpixels(cube_std, params, config["cache_dir"], scene.name)
    spectra = superpixel_mean_spectra(cube_std, superpixels)             # (S, B)
    say(f"SLIC: {spectra.shape[0]} superpixels ({'cache hit' if hit else 'computed'} {cache_path}, "
        f"{time.time() - t0:.1f}s)")
    if spectra.shape[0] < 2 and "pcl" in config["negatives"]:
        say(f"note: one superpixel: every PCL weight is 1, so this is plain SimCLR; a smaller "
            f"--slic_pixels_per_segment (now {config['slic_pixels_per_segment']}) gives more superpixels")
    pseudo = np.zeros((h, w), dtype=np.int64)
    pseudo_purity = None
    if "nsmm" in config["negatives"]:
        k = config["pseudo_k"] or scene.n_classes
        if spectra.shape[0] < 2:  # one superpixel: one pseudolabel whatever k is (and no k-means to run)
            raise one_cluster_error(config, scene.name, spectra.shape[0])
        with distributed.rank0_first(world):  # k-means once, cached for the other ranks
            clusters, _ = cached_superpixel_pseudolabels(spectra, k, config["pseudo_pca"], config["seed"],
                                                         config["cache_dir"], Path(cache_path).stem)
        if len(np.unique(clusters)) < 2:  # every pixel one pseudolabel: NSMM would drop every negative, loss 0
            raise one_cluster_error(config, scene.name, spectra.shape[0])
        pseudo = pixel_pseudolabels(superpixels, clusters)
        pseudo_purity = purity(pseudo, scene.gt)
        say(f"pseudolabels: k-means k={k} on {spectra.shape[0]} superpixels, purity against the "
            f"ground truth {pseudo_purity:.3f} (diagnostic only); map {run_dir / 'pseudolabels.png'}")

    # 3. data on the device: padded cube, per-pixel spectra / pseudolabels / labels (diagnostic);
    # every rank holds all of them, so it indexes the global batch without gathering
    cutter = PatchCutter(cube_std, config["patch_size"], device)
    spectra_t = torch.from_numpy(spectra[superpixels.ravel()]).to(device)   # (H*W, B)
    pseudo_t = torch.from_numpy(pseudo.ravel()).to(device)                   # (H*W,)
    labels_t = torch.from_numpy(scene.gt.ravel().astype(np.int64)).to(device)  # (H*W,)
    pool = torch.from_numpy(pretraining_pool(scene.gt, config["pretrain_pool"]))
    if len(pool) < config["batch_size"]:
        raise UserError(f"pretraining pool ({config['pretrain_pool']}) has {len(pool)} pixels, fewer than "
                        f"--batch_size={config['batch_size']}; pass a smaller --batch_size")
    steps_per_epoch = len(pool) // config["batch_size"]

    # 4. model and optimiser
    torch.manual_seed(config["seed"])
    model = PCLEncoder(bands, config["patch_size"], config["preset"]).to(device)
    model.set_low_memory(config["low_memory"])
    note = set_allocator_policy(device, config["low_memory"])  # keep freed activations, or release them
    if note:
        say(note)
    say(describe(model))
    if world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm over the global batch
    elif world > 1:
        say(f"note: {world} CPU processes (gloo): BatchNorm statistics are per process (SyncBatchNorm "
            f"needs CUDA), so steps differ slightly from one process on the same global batch")
    # fused: one kernel over all parameters (paper preset on CPU: 13 ms a step, 53 ms unfused)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"],
                                 fused=fused_adam(device))

    start_epoch, log = 0, []
    checkpoint_path = run_dir / "checkpoint.pt"
    fingerprint = cube_fingerprint(scene.cube)
    if config["resume"] and checkpoint_path.exists():
        start_epoch, log = resume_from(checkpoint_path, model, optimizer, config, bands, fingerprint)
        say(f"resumed from {checkpoint_path} at epoch {start_epoch}")

    # DDP averages the gradients of the ranks' losses; `model` stays the plain module that is saved
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)
    stop = Stop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    run_dir.mkdir(parents=True, exist_ok=True)
    if "nsmm" in config["negatives"] and rank == 0:  # written once the run is known to go ahead
        save_pseudolabel_map(run_dir / "pseudolabels.png", pseudo)
    total_steps = start_epoch * steps_per_epoch
    model.train()
    stopping = False
    try:
        for epoch in range(start_epoch, config["epochs"]):
            # Every epoch's randomness derives from (seed, epoch): a resumed run repeats it exactly.
            order_gen = torch.Generator().manual_seed(config["seed"] * 100003 + epoch)
            view_gen = torch.Generator().manual_seed(config["seed"] * 100003 + epoch + 7919)
            mine_gen = torch.Generator().manual_seed(config["seed"] * 100003 + epoch + 15485863)
            order = host_to_device(pool[torch.randperm(len(pool), generator=order_gen)], device)
            sums = EpochSums(device)
            t_epoch = time.time()
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config['epochs']}",
                       leave=False, file=sys.stderr, disable=None if rank == 0 else True)
            for step in bar:
                batch_index = order[step * config["batch_size"]:(step + 1) * config["batch_size"]]
                loss = learn_from_batch(net, optimizer, sums, cutter, batch_index, spectra_t, pseudo_t, labels_t,
                                        config, view_gen, mine_gen, autocast, rank, world)
                total_steps += 1
                last = step + 1 == steps_per_epoch or (config["max_steps"] and total_steps >= config["max_steps"])
                stopping = stop.requested if world == 1 else False
                if report_due(step, last):  # a host read waits for the device: not every step
                    # the global loss, and one stop decision for all ranks (no rank may leave a collective)
                    loss_value, stop_votes = distributed.mean_over_ranks([loss.item(), float(stop.requested)], world)
                    stopping = stop_votes > 0
                    rate = (step + 1) * config["batch_size"] / (time.time() - t_epoch)
                    bar.set_postfix(loss=f"{loss_value:.3f}", anchors_s=f"{rate:.0f}")
                if stopping or last:
                    break
            if stopping:
                raise KeyboardInterrupt
            seconds = time.time() - t_epoch
            partial = step + 1 < steps_per_epoch  # cut short by --max_steps
            record = {"epoch": epoch + 1, "seconds": round(seconds, 2),
                      "anchors_per_s": round((step + 1) * config["batch_size"] / seconds, 1),
                      **sums.means(world),
                      **({"steps": step + 1, "of_steps": steps_per_epoch} if partial else {})}
            log.append(record)
            say(json.dumps(record))
            # a partial epoch is in the weights file's log, never in a checkpoint: a resumed run
            # starts from the last whole epoch, so no part of an epoch is skipped
            if rank == 0 and not partial:  # the plain module's state: the same keys with or without DDP
                save_checkpoint(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                  "epoch": epoch + 1, "config": config, "n_bands": bands,
                                                  "scene_fingerprint": fingerprint,
                                                  "log": json.dumps(log), "commit": git_commit()})
                # the log follows the checkpoint: a kill between the two never leaves a half line or an extra epoch
                write_text(run_dir / "log.txt", "".join(json.dumps(r) + "\n" for r in log))
            if config["max_steps"] and total_steps >= config["max_steps"]:
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        distributed.cleanup()
    if rank > 0:
        return weights_path

    # 5. release file: plain module weights + everything needed to rebuild and check it (rank 0 only)
    metadata = {"dataset": scene.name, "scene_fingerprint": fingerprint,
                "n_bands": bands, "n_classes": scene.n_classes, "pretrain_config": config, "precision": precision,
                "pseudolabel_purity": pseudo_purity, "log": log, "commit": git_commit()}
    save_encoder(weights_path, model.cpu(), metadata)
    write_json(run_dir / "config.json", config)
    final = log[-1] if log else {}
    say(f"saved {weights_path}  (loss {final.get('loss', float('nan')):.4f}, "
        f"false-negative share global {final.get('fn_share_global')}, local {final.get('fn_share_local')})")
    return weights_path


if __name__ == "__main__":
    run_main(main)
