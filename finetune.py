"""Evaluate a pretrained encoder (or a baseline) on one scene: OA, AA, kappa over seeded splits.

Recipe: load the scene -> standardise each band (as in pretraining) -> load the encoder
strictly from its safetensors file -> for each seed: split the labelled pixels, train the
classifier (linear probe on frozen features, or the authors' fine-tuning), test on every
other labelled pixel -> results/<dataset>/<name>.json, a per-class CSV and a map PNG.

Edit the settings below, or override any of them: python finetune.py --seeds=0-9 --split=disjoint
"""
import os
# before torch: its CPU allocator then backs large tensors with transparent huge pages
# (fewer page faults on the paper preset's 376 MB activations; docs/BENCHMARKS.md)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import hashlib
import time
import warnings
from pathlib import Path

import numpy as np
import torch

# ---------------------------------------------------------------- settings
# scene
dataset = "SalinasA"        # IndianPines | PaviaU | Salinas | SalinasA | IndianPinesSubset | custom
data_dir = ""               # "" = $HSI_DATA_DIR, else ./datasets
download = True
cube = ""                   # custom scene: PATH[:KEY]
gt = ""                     # custom scene: PATH[:KEY]
class_names = ""            # custom scene: JSON list of class names
layout = "auto"             # custom scene: HWB | BHW | auto
# what to evaluate
method = "encoder"          # encoder: the file in `weights`; pcl | simclr | nsmm | pcl+nsmm: weights/<dataset>/<method>.safetensors;
                            # baselines: svm | svm_spatial | supervised
weights = ""                # "" = weights/<dataset>/encoder.safetensors
preset = ""                 # "" = as in the weights file (set it to check); supervised: the preset to train
protocol = "linear"         # linear: frozen encoder + logistic regression | finetune: the authors' recipe
# labels and splits
split = "random"            # random (the papers') | disjoint (no test patch overlaps a training patch)
train_per_class = 15        # labelled pixels per class for training (at most half of a class)
train_ratio = 0.0           # > 0: a fraction of each class instead of train_per_class
seeds = "0"                 # e.g. 0,1,2 or 0-9: one split and one classifier per seed
patch_size = 15             # baselines only; encoders use the size they were trained with
# classifiers
probe_c = 1.0               # inverse L2 strength of the logistic-regression probe
finetune_epochs = 100       # finetune protocol and supervised baseline
finetune_batch_size = 64
finetune_lr = 1e-3          # heads; the backbone trains at finetune_lr * backbone_lr_scale
backbone_lr_scale = 0.01
# output
name = ""                   # results/<dataset>/<name>.json; "" = <method>_<protocol>_<split>_<budget>
results_dir = "results"
save_map = True             # full-scene map PNG (first seed)
batch_size = 512            # inference batch (bounds memory on any scene size)
device = "auto"
threads = 0
amp = False                 # bf16 autocast on CUDA (GPUs with bf16: compute capability 8.0+) while training
                            # the encoder (protocol=finetune, supervised)
cpu_amp = False             # the same on the CPU: only CPUs with bf16 arithmetic (AVX512-BF16 or AMX);
                            # 1.4x to 2.2x faster paper-preset steps than float32 there, rounds
                            # differently (docs/BENCHMARKS.md)
# -------------------------------------------------------------------------
SETTINGS = [k for k in list(globals()) if not k.startswith("_") and k[0].islower()
            and isinstance(globals()[k], (bool, int, float, str))]

from data import check_data_dir, check_scene_args, load_scene               # noqa: E402
from data.patches import PatchCutter, random_views                     # noqa: E402
from data.preprocess import standardise                                # noqa: E402
from data.splits import make_split                                     # noqa: E402
from data.superpixels import cube_fingerprint                          # noqa: E402
from models.classifier import (TwoHeadClassifier, extract_features, fit_linear_probe,  # noqa: E402
                               pixel_cutter, predict_pixels, train_classifier)
from models.encoder import PCLEncoder, PRESETS, build_encoder          # noqa: E402
from utils.baselines import fit_svm, pca_window_features, spectral_features  # noqa: E402
from utils.checkpoint import git_commit, load_encoder, read_encoder_metadata  # noqa: E402
from utils.config import check_ranges, format_config, resolve_config   # noqa: E402
from utils.device import (amp_note, autocast_for, check_cpu_amp, pick_device, set_allocator_policy,  # noqa: E402
                          training_precision)
from utils.errors import UserError, run_main                           # noqa: E402
from utils.fileio import check_output_dir, write_json, write_text      # noqa: E402
from utils.maps import save_comparison_png, save_map_png               # noqa: E402
from utils.metrics import classification_scores                        # noqa: E402

ENCODER_METHODS = ("encoder", "pcl", "simclr", "nsmm", "pcl+nsmm")
METHODS = ENCODER_METHODS + ("svm", "svm_spatial", "supervised")


def parse_seeds(text):
    """'0-9' or '0,1,5' -> [0, 1, ...]."""
    try:
        if "-" in text:
            lo, hi = text.split("-")
            return list(range(int(lo), int(hi) + 1))
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds={text}: expected a list like 0,1,2 or a range like 0-9") from None


def scene_fingerprint(scene):
    """Short hash of a scene's cube and labels: a result names the exact data it was made on."""
    return f"{cube_fingerprint(scene.cube)}-{cube_fingerprint(scene.gt)}"


def weights_path_for(config):
    if config["weights"]:
        return Path(config["weights"])
    stem = "encoder" if config["method"] == "encoder" else config["method"]
    return Path("weights") / config["dataset"] / f"{stem}.safetensors"


def run_stem(config):
    """The first part of a result's name: the method; for --method=encoder "encoder", or with
    --weights=FILE "encoder-<FILE's stem>", so results of two encoder files do not overwrite
    each other, nor a table's cells (named after the methods: pcl_..., simclr_...)."""
    stem = weights_path_for(config).stem
    if config["method"] == "encoder" and stem != "encoder":
        return f"encoder-{stem}"
    return config["method"]


def load_checked_encoder(path, scene, config, device):
    """Load the encoder strictly and check it was pretrained on this scene with this preset."""
    encoder, meta = load_encoder(path, build_encoder, device)
    expected = {"dataset": scene.name, "n_bands": scene.n_bands}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise UserError(f"{path}: encoder pretrained with {key}={meta.get(key)}, but this run has "
                            f"{key}={value}; pretrain on this scene or pass the right --weights")
    if meta.get("scene_fingerprint") != cube_fingerprint(scene.cube):
        raise UserError(f"{path}: encoder pretrained on different data than {scene.name} as loaded now "
                        f"from {scene.files.get('cube', 'the cube file')}; pretrain again on this cube")
    if config["preset"] and meta["encoder_config"].get("preset") != config["preset"]:
        raise UserError(f"{path}: encoder preset is {meta['encoder_config'].get('preset')!r}, "
                        f"not --preset={config['preset']}")
    return encoder, meta


def state_digest(module):
    """SHA-1 over every parameter and buffer: proves a frozen encoder did not change."""
    h = hashlib.sha1()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().numpy().tobytes())
    return h.hexdigest()


class Evaluator:
    """Trains the chosen classifier on a split and predicts pixels; one per run, reused over seeds."""

    def __init__(self, config, scene, cube_std, device):
        self.config, self.scene, self.device = config, scene, device
        self.method = config["method"]
        self.encoder = self.meta = None
        self.feature_cache = None
        if self.method in ENCODER_METHODS:
            path = weights_path_for(config)
            self.encoder, self.meta = load_checked_encoder(path, scene, config, device)
            self.weights_path = str(path)
            self.patch_size = self.encoder.config["patch_size"]
        else:
            self.weights_path = None
            self.patch_size = config["patch_size"]
        self.cutter = PatchCutter(cube_std, self.patch_size, device)
        if self.method == "svm":
            self.feature_cache = spectral_features(cube_std)
        elif self.method == "svm_spatial":
            self.feature_cache = pca_window_features(cube_std)
        elif self.encoder is not None and config["protocol"] == "linear":
            labelled = np.flatnonzero(scene.gt.ravel() > 0)
            self.labelled_index = {int(p): i for i, p in enumerate(labelled)}
            self.digest = state_digest(self.encoder)
            # the encoder is frozen: its per-pixel stage is computed once for the whole scene
            start = time.perf_counter()
            self.pixels = pixel_cutter(self.encoder, self.cutter)
            self.pixel_map_seconds = time.perf_counter() - start
            self.labelled_features = extract_features(self.encoder, self.cutter, labelled, config["batch_size"],
                                                      pixels=self.pixels)

    def _features(self, flat_index):
        if self.feature_cache is not None:
            return self.feature_cache[flat_index]
        rows = [self.labelled_index[int(p)] for p in flat_index]
        return self.labelled_features[rows]

    def fit(self, train, labels, seed):
        """Train on pixels `train` (flat indices) with labels 1..K; returns predict(flat_index) -> labels."""
        cfg = self.config
        if self.method in ("svm", "svm_spatial"):
            predict = fit_svm(self._features(train), labels, seed)
            return lambda idx: predict(self.feature_cache[idx])
        if self.encoder is not None and cfg["protocol"] == "linear":
            probe = fit_linear_probe(self._features(train), labels, seed, cfg["probe_c"])
            self._check_frozen()

            def predict(idx):
                idx = np.asarray(idx)
                if all(int(p) in self.labelled_index for p in idx):
                    return probe(self._features(idx))  # features extracted once at start
                return probe(extract_features(self.encoder, self.cutter, idx, cfg["batch_size"], pixels=self.pixels))
            return predict
        # finetune protocol, or the supervised baseline (same encoder, from scratch, full lr)
        torch.manual_seed(seed)
        if self.method == "supervised":
            encoder = PCLEncoder(self.scene.n_bands, self.patch_size, cfg["preset"] or "small")
            lr_scale = 1.0
        else:
            encoder = build_encoder(self.encoder.config)
            encoder.load_state_dict(self.encoder.state_dict())
            lr_scale = cfg["backbone_lr_scale"]
        model = TwoHeadClassifier(encoder, self.scene.n_classes).to(self.device)
        augment = (lambda x, g: random_views(x, g)) if self.method == "supervised" else None
        train_classifier(model, self.cutter, train, labels, cfg["finetune_epochs"], cfg["finetune_batch_size"],
                         cfg["finetune_lr"], lr_scale, seed=seed, augment=augment,
                         autocast=autocast_for(self.device, cfg["amp"], cfg["cpu_amp"]))
        pixels = []  # the trained model's pixel map, made on the first prediction

        def predict(idx):
            if not pixels:
                pixels.append(pixel_cutter(model.encoder, self.cutter))
            return predict_pixels(model, self.cutter, np.asarray(idx), cfg["batch_size"], pixels[0])
        return predict

    def _check_frozen(self):
        if state_digest(self.encoder) != self.digest:
            raise RuntimeError("the frozen encoder changed during linear probing")


def predict_scene(predict, n_pixels, batch_size):
    """Every pixel of the scene, in batches: (H*W,) labels 1..K."""
    out = np.zeros(n_pixels, dtype=np.int64)
    for start in range(0, n_pixels, batch_size * 8):
        idx = np.arange(start, min(start + batch_size * 8, n_pixels))
        out[idx] = predict(idx)
    return out


def trains_the_encoder(config):
    """Whether a run trains the encoder: the finetune protocol, or the supervised baseline."""
    return config["method"] == "supervised" or (config["method"] in ENCODER_METHODS
                                                and config["protocol"] == "finetune")


def run_precision(config, device):
    """What training the encoder runs in, 'bf16' or 'float32' (float32 when nothing trains)."""
    if not trains_the_encoder(config):
        return "float32"
    return training_precision(device, config["amp"], config["cpu_amp"])


def summarise(runs, n_classes):
    """Mean and std over seeds of OA, AA, kappa and per-class accuracy."""
    summary = {}
    for key in ("oa", "aa", "kappa"):
        values = np.array([r["scores"][key] for r in runs])
        summary[key] = {"mean": float(values.mean()), "std": float(values.std())}
    # (seeds, K); a class with no test pixel under a seed's split has no accuracy (NaN) there
    per_class = np.array([[np.nan if a is None else a for a in r["scores"]["per_class_accuracy"]] for r in runs])
    with warnings.catch_warnings():  # a class no seed scored is NaN (null in the JSON), not a console warning
        warnings.simplefilter("ignore", RuntimeWarning)
        summary["per_class_accuracy"] = {"mean": np.nanmean(per_class, 0).tolist(),
                                         "std": np.nanstd(per_class, 0).tolist()}
    return summary


def per_class_table(scene, runs, summary):
    """CSV text: class, name, train and test counts (mean over seeds), accuracy mean and std (%)."""
    lines = ["class,name,train,test,accuracy_mean,accuracy_std"]
    gt = scene.gt.ravel()
    for c in range(1, scene.n_classes + 1):
        n_train = np.mean([np.sum(gt[r["train"]] == c) for r in runs])
        n_test = np.mean([np.sum(gt[r["test"]] == c) for r in runs])
        mean = summary["per_class_accuracy"]["mean"][c - 1]
        std = summary["per_class_accuracy"]["std"][c - 1]
        lines.append(f"{c},{scene.class_names[c - 1]},{n_train:g},{n_test:g},{100 * mean:.2f},{100 * std:.2f}")
    return "\n".join(lines) + "\n"


RANGES = {  # settings whose values outside these ranges would give a traceback or an untrained head
    "train_ratio": (lambda v: 0 <= v < 1, "a number in [0, 1) (0: use --train_per_class)"),
    "patch_size": (lambda v: v >= 1 and v % 2 == 1, "an odd number"),
    "probe_c": (lambda v: v > 0, "a number > 0"),
    "finetune_epochs": (lambda v: v >= 1, "an integer >= 1"),
    "finetune_batch_size": (lambda v: v >= 2, "an integer >= 2 (BatchNorm needs two samples)"),
    "finetune_lr": (lambda v: v > 0, "a number > 0"),
    "backbone_lr_scale": (lambda v: v >= 0, "a number >= 0"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "threads": (lambda v: v >= 0, "an integer >= 0"),
}


CHOICES = {"method": METHODS, "protocol": ("linear", "finetune"), "split": ("random", "disjoint"),
           "preset": ("",) + tuple(PRESETS)}


def checked_seeds(text):
    """--seeds as a list: non-empty, distinct, each >= 0 (else a one-line UserError)."""
    seeds = parse_seeds(text)
    if not seeds:
        raise UserError("--seeds is empty")
    if len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds={text}: a seed is given twice (it would count twice in the mean)")
    if min(seeds) < 0:
        raise UserError(f"--seeds={text}: seeds must be >= 0")
    return seeds


def checked_config(argv):
    """(settings, seeds) of a run: the defaults above with `argv` applied, every value checked
    (one-line UserError), the dataset's proper name. Reads no file (utils.table checks with it too)."""
    config = resolve_config({k: globals()[k] for k in SETTINGS}, argv, choices=CHOICES)
    check_ranges(config, RANGES)
    # "salinasa" -> "SalinasA" (one folder per scene); a custom scene names its files
    config["dataset"] = check_scene_args(config["dataset"], config["cube"], config["gt"], config["class_names"])
    seeds = checked_seeds(config["seeds"])
    if config["train_per_class"] < 1 and config["train_ratio"] <= 0:
        raise UserError("--train_per_class must be >= 1 (or give --train_ratio)")
    return config, seeds


def main(argv):
    config, seed_list = checked_config(argv)
    if config["threads"] > 0:
        torch.set_num_threads(config["threads"])
    device = pick_device(config["device"])
    check_cpu_amp(device, config["cpu_amp"])  # before any work
    set_allocator_policy(device, low_memory=False)  # reuse freed activations (speed; docs/BENCHMARKS.md)
    budget = f"r{config['train_ratio']:g}" if config["train_ratio"] > 0 else f"{config['train_per_class']}pc"
    protocol = config["protocol"] if config["method"] in ENCODER_METHODS else "baseline"
    run_name = config["name"] or f"{run_stem(config)}_{protocol}_{config['split']}_{budget}"
    if config["method"] in ENCODER_METHODS:  # missing or unreadable weights are refused before loading the scene
        read_encoder_metadata(weights_path_for(config))
    out_dir = Path(config["results_dir"]) / config["dataset"]
    check_data_dir(config["data_dir"], config["dataset"])  # a mistyped folder is refused, not created
    check_output_dir(out_dir, f"--results_dir={config['results_dir']}")  # before any work
    print(f"finetune.py  commit {git_commit()}  device {device}  torch {torch.__version__}")
    print(format_config(config))
    trains_encoder = trains_the_encoder(config)
    if config["cpu_amp"] and device.type == "cpu" and not trains_encoder:
        print(f"note: --cpu_amp applies to training the encoder (--protocol=finetune, --method=supervised); "
              f"this run ({config['method']}, {protocol}) trains none and runs in float32")
    note = amp_note(device, config["amp"]) if trains_encoder else None
    if note:
        print(note)
    precision = run_precision(config, device)  # recorded with the results

    t_start = time.time()
    scene = load_scene(config["dataset"], config["data_dir"], config["download"], config["cube"],
                       config["gt"], config["class_names"], config["layout"])
    cube_std = standardise(scene.cube)
    evaluator = Evaluator(config, scene, cube_std, device)
    if evaluator.meta is not None:
        pre = evaluator.meta.get("pretrain_config", {})
        print(f"encoder {evaluator.weights_path}: preset {evaluator.encoder.config['preset']}, "
              f"negatives {pre.get('negatives')}, {len(evaluator.meta.get('log', []))} epochs, "
              f"pretrain pool {pre.get('pretrain_pool')}")

    gt_flat = scene.gt.ravel()
    runs, notes = [], []
    for seed in seed_list:
        split = make_split(scene.gt, config["split"], config["train_per_class"], seed, evaluator.patch_size,
                           config["train_ratio"], scene.class_names)
        for note in split.notes:
            if note not in notes:
                notes.append(note)
                print(f"note: {note}")
        predict = evaluator.fit(split.train, gt_flat[split.train], seed)
        predicted = predict(split.test)
        scores = classification_scores(gt_flat[split.test], predicted, scene.n_classes)
        runs.append({"seed": seed, "scores": scores, "train": split.train.tolist(), "test": split.test.tolist(),
                     "margin_removed": split.margin_removed})
        print(f"seed {seed}: OA {100 * scores['oa']:.2f}  AA {100 * scores['aa']:.2f}  "
              f"kappa {100 * scores['kappa']:.2f}  ({len(split.train)} train, {len(split.test)} test pixels)")
        if config["save_map"] and seed == seed_list[0]:  # written with the results, after every seed ran
            first_map = (seed, scores["oa"],
                         predict_scene(predict, gt_flat.size, config["batch_size"]).reshape(scene.gt.shape))

    stale_maps = [] if config["save_map"] else [p for p in (out_dir / f"{run_name}_map.png",
                                                          out_dir / f"{run_name}_prediction.png") if p.exists()]
    if config["save_map"]:
        seed, oa, prediction = first_map
        map_path = out_dir / f"{run_name}_map.png"
        save_map_png(out_dir / f"{run_name}_prediction.png", prediction, scene.palette)
        save_comparison_png(map_path, prediction, scene.gt, scene.palette, scene.class_names,
                            f"{scene.name} {run_name} seed {seed}: OA {100 * oa:.2f}")
        print(f"map: {map_path}")
    summary = summarise(runs, scene.n_classes)
    csv_path = out_dir / f"{run_name}_per_class.csv"
    table = per_class_table(scene, runs, summary)
    write_text(csv_path, table)
    print(table.rstrip())
    json_path = out_dir / f"{run_name}.json"
    write_json(json_path, {
        "dataset": scene.name, "method": config["method"], "protocol": protocol, "split": config["split"],
        "class_names": scene.class_names, "scene_fingerprint": scene_fingerprint(scene),
        "config": config, "precision": precision, "notes": notes, "summary": summary, "runs": runs,
        "weights": evaluator.weights_path, "encoder_metadata": evaluator.meta, "commit": git_commit(),
        "seconds": round(time.time() - t_start, 1), "torch": torch.__version__, "device": str(device),
    })
    for path in stale_maps:  # an earlier run's maps beside this run's results would mislead
        path.unlink()
        print(f"note: removed {path}, an earlier run's map (this run has --save_map=false)")
    s = summary
    print(f"OA {100 * s['oa']['mean']:.2f} +- {100 * s['oa']['std']:.2f}  "
          f"AA {100 * s['aa']['mean']:.2f} +- {100 * s['aa']['std']:.2f}  "
          f"kappa {100 * s['kappa']['mean']:.2f} +- {100 * s['kappa']['std']:.2f}  "
          f"({len(runs)} seed{'s' if len(runs) > 1 else ''})  {json_path}")
    return json_path


if __name__ == "__main__":
    run_main(main, interrupted="interrupted: no result JSON was written for this run; "
                               "earlier results are untouched")
