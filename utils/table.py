"""Comparison table: every method through the same splits, seeds and metric code.

    python -m utils.table --dataset=SalinasA --budgets=5,10,15 --splits=random,disjoint --seeds=0-9

Pretrains the encoders the table needs (weights/<dataset>/<mode>.safetensors, kept when the
file exists and was pretrained with the settings this table asks for; refused when it was made
with others: pass --force=true to pretrain again, or a --tag to keep both), runs finetune.py for
every method x split x budget (kept when its JSON exists with the same settings, scene data
and encoder, else run again; every cell runs again with --force=true), then writes results/<dataset>/table.md and table.csv: OA, AA, kappa as
mean +- std over the seeds, and the pretraining false-negative share beside each encoder row.
`--pretrain_args` / `--finetune_args` pass extra settings through (e.g. a custom scene's files).

The table passes --preset, --epochs, --batch_size and --lr to pretrain_main.py and
--finetune_epochs to finetune.py itself: their defaults here are the values at the top of those
scripts (read when this module is imported), so an edit there reaches the table too. Every
value either script would refuse is refused before anything is pretrained (check_table).
"""
import json
import sys
import time
from pathlib import Path

import finetune
import pretrain_main
from data import check_data_dir, load_scene
from data.loading import scene_name
from utils.checkpoint import read_encoder_metadata
from utils.config import defaults_from_module, format_config, resolve_config
from utils.device import check_cpu_amp, pick_device, training_precision
from utils.errors import UserError, run_main
from utils.fileio import check_output_dir, finite_or_none, write_text

# The settings the table passes to the scripts itself default to the scripts' own (the names at
# the top of pretrain_main.py and finetune.py), so `python -m utils.table` pretrains and
# evaluates as `python pretrain_main.py` and `python finetune.py` would.
DEFAULTS = {
    "dataset": pretrain_main.dataset, "data_dir": "", "methods": "svm,svm_spatial,supervised,simclr,pcl,nsmm,pcl+nsmm",
    "budgets": "5,10,15", "splits": "random,disjoint", "seeds": "0-9", "protocol": finetune.protocol,
    "preset": pretrain_main.preset, "epochs": pretrain_main.epochs, "batch_size": pretrain_main.batch_size,
    "lr": pretrain_main.lr, "threads": 0, "device": "auto", "finetune_epochs": finetune.finetune_epochs,
    "results_dir": finetune.results_dir, "force": False, "pretrain_args": "", "finetune_args": "", "tag": "",
}
# encoder method -> the pretrain_main.py negatives mode that makes it
PRETRAIN_MODE = {"simclr": "all", "pcl": "pcl", "nsmm": "nsmm", "pcl+nsmm": "pcl+nsmm"}


def weights_path(cfg, method):
    """weights/<dataset>/<method><tag>.safetensors: a tag keeps variants apart."""
    return Path("weights") / cfg["dataset"] / f"{method}{cfg['tag']}.safetensors"


# settings that do not change what a run computes (where files are, devices, logging); a cut-short
# run is not the same encoder, and bf16 rounds differently, so a table keeps bf16 and float32 work
# apart: by the precision a file records, or for older files by the flags (changed_settings)
PRECISION = {"amp", "cpu_amp"}
PRETRAIN_FREE = set(pretrain_main.RESUME_FREE) - {"epochs", "max_steps"} - PRECISION
FINETUNE_FREE = {"data_dir", "download", "device", "threads", "results_dir", "save_map", "batch_size", "name"}


def changed_settings(stored, expected, free, defaults, precision=(None, None)):
    """['--name was X, now Y', ...] for every setting outside `free` whose stored value differs.

    A setting the stored config lacks (written before the setting existed) counts as its
    default in `defaults`, the value such a run computed with; a file with no stored config at
    all matches nothing. precision: (stored, expected) 'bf16' or 'float32', what training ran
    in and would run in; where the stored one was recorded it is compared instead of the amp
    and cpu_amp flags, which alone do not say what ran (amp does nothing on a CPU or an older GPU).
    """
    if not isinstance(stored, dict):
        return ["its settings were not recorded"]
    changed = []
    if precision[0] is not None:
        free = set(free) | PRECISION
        if precision[0] != precision[1]:
            changed.append(f"it was trained in {precision[0]}, this run would train in {precision[1]}")
    was = {k: stored.get(k, defaults.get(k)) for k in expected}
    return changed + [f"--{k} was {was[k]!r}, now {v!r}" for k, v in expected.items()
                      if k not in free and was[k] != v]


def pretrain_argv(cfg, path, method):
    """pretrain_main.py's arguments for one encoder of the table."""
    return [f"--dataset={cfg['dataset']}", f"--data_dir={cfg['data_dir']}", f"--negatives={PRETRAIN_MODE[method]}",
            f"--preset={cfg['preset']}", f"--epochs={cfg['epochs']}", f"--batch_size={cfg['batch_size']}",
            f"--lr={cfg['lr']}", f"--out_name={path.stem}", f"--device={cfg['device']}",
            f"--threads={cfg['threads']}", "--resume=false"] + cfg["pretrain_args"].split()


def existing_encoder_fits(cfg, method):
    """True when weights/<dataset>/<method>.safetensors is there to be reused, False when it is
    absent or --force=true asks to pretrain it again.

    An existing file pretrained with other settings than this table's is refused (UserError):
    pretraining again would overwrite it, and using it would mislabel the table.
    """
    path = weights_path(cfg, method)
    if not path.exists() or cfg["force"]:
        return False
    defaults = defaults_from_module(vars(pretrain_main), pretrain_main.SETTINGS)
    expected = pretrain_main.resolve_negatives(resolve_config(defaults, pretrain_argv(cfg, path, method)))
    metadata = read_encoder_metadata(path)
    precision = (metadata.get("precision"),
                 training_precision(pick_device(expected["device"]), expected["amp"], expected["cpu_amp"]))
    changed = changed_settings(metadata.get("pretrain_config"), expected, PRETRAIN_FREE, defaults, precision)
    if changed:
        raise UserError(f"{path}: pretrained with other settings than this table's ({'; '.join(changed[:4])}); "
                        f"pass --force=true to pretrain it again, or --tag=NAME to keep both")
    return True


def pretrain_if_missing(cfg, method):
    """weights/<dataset>/<method>.safetensors, pretrained now if absent. Returns its path.

    An existing file pretrained with other settings is refused (existing_encoder_fits).
    """
    path = weights_path(cfg, method)
    if existing_encoder_fits(cfg, method):
        return path
    argv = pretrain_argv(cfg, path, method)
    t0 = time.time()
    pretrain_main.main(argv)
    print(f"[table] pretrained {method} in {time.time() - t0:.0f}s", flush=True)
    return path


def current_scene_fingerprint(cfg):
    """finetune.scene_fingerprint of the scene the table's cells would load now."""
    c = resolve_config(defaults_from_module(vars(finetune), finetune.SETTINGS),
                       [f"--dataset={cfg['dataset']}", f"--data_dir={cfg['data_dir']}"] + cfg["finetune_args"].split())
    scene = load_scene(c["dataset"], c["data_dir"], c["download"], c["cube"], c["gt"], c["class_names"], c["layout"])
    return finetune.scene_fingerprint(scene)


def stale_cell(path, argv, weights, scene_fingerprint):
    """Why the result JSON at `path` is not this table's cell ('' when it is): other
    finetune.py settings, other scene data (a custom scene's files rewritten in place), or
    another encoder file than `weights` (None for baselines)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return "unreadable"
    defaults = defaults_from_module(vars(finetune), finetune.SETTINGS)
    expected = resolve_config(defaults, argv)
    precision = (result.get("precision"), finetune.run_precision(expected, pick_device(expected["device"])))
    changed = changed_settings(result.get("config"), expected, FINETUNE_FREE, defaults, precision)
    if changed:
        return "; ".join(changed[:4])
    if result.get("scene_fingerprint") != scene_fingerprint:
        return "the scene's cube or labels are not the ones it was made on"
    if weights is not None and result.get("encoder_metadata") != finite_or_none(read_encoder_metadata(weights)):
        return f"{weights} was pretrained again since"
    return ""


def run_cell(cfg, method, split, budget, scene_fingerprint):
    """finetune.py for one cell; returns its JSON (re-used when it is there with the same
    settings and encoder, run again otherwise)."""
    protocol = cfg["protocol"] if method in PRETRAIN_MODE else "baseline"
    name = f"{method}_{protocol}_{split}_{budget}pc{cfg['tag']}"
    path = Path(cfg["results_dir"]) / cfg["dataset"] / f"{name}.json"
    argv = cell_argv(cfg, method, split, budget, name)
    weights = weights_path(cfg, method) if method in PRETRAIN_MODE else None
    stale = "" if not path.exists() or cfg["force"] else stale_cell(path, argv, weights, scene_fingerprint)
    if stale:
        print(f"[table] {path}: out of date ({stale}); running it again", flush=True)
    if not path.exists() or cfg["force"] or stale:
        finetune.main(argv)
    return json.loads(path.read_text())


def encoder_patch_size(cfg):
    """The patch size the table's encoders are pretrained with (pretrain_main.py's own, or the
    one --pretrain_args gives)."""
    defaults = defaults_from_module(vars(pretrain_main), pretrain_main.SETTINGS)
    return resolve_config(defaults, cfg["pretrain_args"].split())["patch_size"]


def cell_argv(cfg, method, split, budget, name):
    """finetune.py's arguments for one cell of the table. Baselines get the encoders' patch
    size: the disjoint split's margin is the patch size, so every method splits the same way."""
    baseline = [] if method in PRETRAIN_MODE else [f"--patch_size={encoder_patch_size(cfg)}"]
    argv = [f"--dataset={cfg['dataset']}", f"--data_dir={cfg['data_dir']}", f"--method={method}",
            f"--protocol={cfg['protocol']}", f"--split={split}", f"--train_per_class={budget}",
            f"--seeds={cfg['seeds']}", f"--name={name}", f"--results_dir={cfg['results_dir']}",
            f"--device={cfg['device']}", f"--threads={cfg['threads']}", "--save_map=false",
            f"--finetune_epochs={cfg['finetune_epochs']}"] + baseline + cfg["finetune_args"].split()
    if method == "supervised":
        argv.append(f"--preset={cfg['preset']}")
    if method in PRETRAIN_MODE:
        argv.append(f"--weights={weights_path(cfg, method)}")
    return argv


def fmt(stat):
    """'mean ± std' in %, or 'n/a' where the metric is undefined (null in the JSON)."""
    if stat["mean"] is None or stat["std"] is None:
        return "n/a"
    return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"


def num(value):
    return "" if value is None else f"{value:.4f}"


def false_negative_share(result):
    """Last-epoch false-negative share (global branch) of the encoder behind a result, if any."""
    meta = result.get("encoder_metadata") or {}
    log = meta.get("log") or []
    value = log[-1].get("fn_share_global") if log else None
    return "" if value is None else f"{value:.3f}"


def comma_list(cfg, name):
    """The comma-separated values of --name; refused when there are none."""
    values = [v.strip() for v in cfg[name].split(",") if v.strip()]
    if not values:
        raise UserError(f"--{name} is empty")
    return values


def no_repeats(name, text, values):
    """Refuse a value given twice in --name: it would make two rows or columns of one cell."""
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise UserError(f"--{name}={text}: {repeated[0]} is given twice")
    return values


def parse_methods(cfg):
    """--methods as a list of finetune.py methods."""
    methods = comma_list(cfg, "methods")
    unknown = [m for m in methods if m not in finetune.METHODS]
    if unknown:
        raise UserError(f"--methods: unknown {', '.join(unknown)}; valid: {', '.join(finetune.METHODS)}")
    return no_repeats("methods", cfg["methods"], methods)


def parse_splits(cfg):
    """--splits as a list of finetune.py's --split values."""
    splits = comma_list(cfg, "splits")
    allowed = finetune.CHOICES["split"]
    unknown = [s for s in splits if s not in allowed]
    if unknown:
        raise UserError(f"--splits: unknown {', '.join(unknown)}; valid: {', '.join(allowed)}")
    return no_repeats("splits", cfg["splits"], splits)


def parse_budgets(cfg):
    """--budgets as a list of labelled pixels per class, each a whole number >= 1."""
    texts = comma_list(cfg, "budgets")
    try:
        budgets = [int(b) for b in texts]
    except ValueError:
        budgets = []
    if len(budgets) < len(texts) or min(budgets) < 1:
        raise UserError(f"--budgets={cfg['budgets']}: expected whole numbers >= 1 (labelled pixels per class), "
                        f"like 5,10,15")
    return no_repeats("budgets", cfg["budgets"], budgets)


def check_same_disjoint_split(cfg, methods, splits):
    """Refuse a baseline --patch_size (through --finetune_args) other than the encoders' when the
    table has a disjoint split: its margin is the patch size, so the methods would not be
    tested on the same pixels."""
    if "disjoint" not in splits or not any(m in PRETRAIN_MODE for m in methods):
        return
    patch = encoder_patch_size(cfg)
    for method in methods:
        if method not in PRETRAIN_MODE:
            argv = cell_argv(cfg, method, "disjoint", 1, "check")
            other = resolve_config(defaults_from_module(vars(finetune), finetune.SETTINGS), argv)["patch_size"]
            if other != patch:
                raise UserError(f"--finetune_args: --patch_size={other} for the baselines, but the encoders are "
                                f"pretrained with --patch_size={patch}; the disjoint split's margin is the patch "
                                f"size, so the methods would not share a split: leave --patch_size out of "
                                f"--finetune_args (the table gives the baselines the encoders' patch size)")


# settings the table gives each script itself, and the table's own setting that chooses them:
# passed through --pretrain_args / --finetune_args they would override it and mislabel the cells
TABLE_SETS_PRETRAIN = {"dataset": "dataset", "data_dir": "data_dir", "negatives": "methods", "weighting": "methods",
                       "preset": "preset", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
                       "out_name": "tag", "device": "device", "threads": "threads", "resume": "force"}
TABLE_SETS_FINETUNE = {"dataset": "dataset", "data_dir": "data_dir", "method": "methods", "protocol": "protocol",
                       "split": "splits", "train_per_class": "budgets", "train_ratio": "budgets", "seeds": "seeds",
                       "name": "tag", "results_dir": "results_dir", "device": "device", "threads": "threads",
                       "save_map": "save_map", "finetune_epochs": "finetune_epochs", "weights": "tag"}


def check_pass_through(cfg):
    """Refuse a setting in --pretrain_args / --finetune_args that the table sets itself."""
    for flag, sets in (("pretrain_args", TABLE_SETS_PRETRAIN), ("finetune_args", TABLE_SETS_FINETUNE)):
        for arg in cfg[flag].split():
            name = arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") else ""
            if name in sets:
                own = "" if sets[name] == "save_map" else f"; use the table's --{sets[name]}"
                raise UserError(f"--{flag}: --{name} is set by the table itself for each "
                                f"{'encoder' if flag == 'pretrain_args' else 'cell'}{own}")


def check_table(cfg):
    """Every setting of the table, before any work: its own lists, then the arguments it would
    pass to pretrain_main.py for each encoder and to finetune.py for each cell, checked as those
    scripts check them. Returns (methods, splits, budgets)."""
    for script, args in ((pretrain_main, cfg["pretrain_args"]), (finetune, cfg["finetune_args"])):
        extra = resolve_config(defaults_from_module(vars(script), script.SETTINGS), args.split())
        check_cpu_amp(pick_device(cfg["device"]), extra["cpu_amp"])  # not after hours of pretraining
    check_pass_through(cfg)
    methods, splits, budgets = parse_methods(cfg), parse_splits(cfg), parse_budgets(cfg)
    finetune.checked_seeds(cfg["seeds"])
    for method in methods:  # the scripts' own checks, on the arguments the table will pass them
        if method in PRETRAIN_MODE:
            pretrain_main.checked_config(pretrain_argv(cfg, weights_path(cfg, method), method))
        for split in splits:
            for budget in budgets:
                finetune.checked_config(cell_argv(cfg, method, split, budget, "check"))
    check_same_disjoint_split(cfg, methods, splits)
    check_data_dir(cfg["data_dir"], cfg["dataset"])  # a mistyped folder is refused, not created
    check_output_dir(Path(cfg["results_dir"]) / cfg["dataset"], f"--results_dir={cfg['results_dir']}")
    check_output_dir(Path("weights") / cfg["dataset"], "the weights folder")
    return methods, splits, budgets


def table_text(cfg, methods, splits, budgets, cells):
    """(table.md text, table.csv text) of the evaluated cells."""
    columns = [(s, b) for s in splits for b in budgets]
    md = [f"Scene {cfg['dataset']}, protocol {cfg['protocol']}, seeds {cfg['seeds']}, preset {cfg['preset']}, "
          f"{cfg['epochs']} pretraining epochs. OA / AA / kappa in %, mean ± std over seeds.", "",
          "| method | FN share | " + " | ".join(f"{s} {b}/class OA | AA | κ" for s, b in columns) + " |",
          "|---|---|" + "---|---|---|" * len(columns)]
    csv = ["method,split,per_class,oa_mean,oa_std,aa_mean,aa_std,kappa_mean,kappa_std,fn_share,seconds"]
    for method in methods:
        row = [method, false_negative_share(cells[method, splits[0], budgets[0]])]
        for split, budget in columns:
            r = cells[method, split, budget]
            s = r["summary"]
            row += [fmt(s["oa"]), fmt(s["aa"]), fmt(s["kappa"])]
            values = [s[m][k] for m in ("oa", "aa", "kappa") for k in ("mean", "std")]
            csv.append(f"{method},{split},{budget}," + ",".join(num(v) for v in values)
                       + f",{false_negative_share(r)},{r.get('seconds', '')}")
        md.append("| " + " | ".join(row) + " |")
    return "\n".join(md) + "\n", "\n".join(csv) + "\n"


def main(argv):
    cfg = resolve_config(DEFAULTS, argv)
    cfg["dataset"] = scene_name(cfg["dataset"])  # "salinasa" -> "SalinasA", before any path is built
    methods, splits, budgets = check_table(cfg)  # anything either script would refuse, before any work
    print(format_config(cfg))
    t0 = time.time()
    fingerprint = current_scene_fingerprint(cfg)  # the cells' scene loads (or is refused) before pretraining
    encoders = [m for m in methods if m in PRETRAIN_MODE]
    for method in encoders:  # every encoder file of other settings is refused before pretraining any
        existing_encoder_fits(cfg, method)
    for method in encoders:
        pretrain_if_missing(cfg, method)
    cells = {}
    for split in splits:
        for budget in budgets:
            for method in methods:
                t = time.time()
                cells[method, split, budget] = run_cell(cfg, method, split, budget, fingerprint)
                print(f"[table] {method} {split} {budget}/class: {time.time() - t:.0f}s", flush=True)
    md, csv = table_text(cfg, methods, splits, budgets, cells)
    table_md = Path(cfg["results_dir"]) / cfg["dataset"] / f"table{cfg['tag']}.md"
    write_text(table_md, md)
    write_text(table_md.with_suffix(".csv"), csv)
    print(md.rstrip())
    print(f"[table] {time.time() - t0:.0f}s  {table_md}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
