"""Paired comparison of one method against the others, seed by seed, on the same splits.

    python -m utils.paired --dataset=IndianPinesSubset --method=pcl

Every method of a comparison table ran on the same train/test pixels for a given seed, so the
per-seed OA difference removes the split-to-split variation that dominates the std of each
method alone. Reads results/<dataset>/<method>_<protocol>_<split>_<budget>pc<tag>.json written
by utils.table (`--tag` as there); prints a Markdown table (mean difference in OA points +- std
over the seeds both files have, and on how many seeds the method won) and writes it to
results/<dataset>/paired_<method><tag>.md.

Two files are compared only when they are a like-for-like pair: each holds the method, split,
label budget and protocol its name says, both were made on the same scene data, they share at
least one seed, and each shared seed trained on the same pixels; otherwise one line says which
two files differ and how.
"""
import json
import sys
from pathlib import Path

import numpy as np

import finetune
from data.loading import scene_name
from utils.config import resolve_config
from utils.errors import UserError, run_main
from utils.fileio import write_text
from utils.table import DEFAULTS as TABLE_DEFAULTS
from utils.table import PRETRAIN_MODE, comma_list, parse_budgets, parse_splits

DEFAULTS = {"dataset": TABLE_DEFAULTS["dataset"], "method": "pcl",
            "others": "",  # "" = every other method of utils.table's default --methods
            "budgets": TABLE_DEFAULTS["budgets"], "splits": TABLE_DEFAULTS["splits"],
            "protocol": TABLE_DEFAULTS["protocol"],
            "results_dir": TABLE_DEFAULTS["results_dir"], "tag": ""}
CHOICES = {"method": finetune.CHOICES["method"], "protocol": finetune.CHOICES["protocol"]}


def protocol_of(method, protocol):
    """The protocol part of a cell's file name: baselines have none of their own."""
    return protocol if method in PRETRAIN_MODE else "baseline"


def cell_path(folder, method, split, budget, protocol, tag):
    """results/<dataset>/<method>_<protocol>_<split>_<budget>pc<tag>.json, as utils.table names it."""
    return Path(folder) / f"{method}_{protocol_of(method, protocol)}_{split}_{budget}pc{tag}.json"


def read_result(path):
    """The result JSON at `path` (finetune.py's), or a one-line error naming the file."""
    if not path.exists():
        raise UserError(f"{path}: no such result; run python -m utils.table first")
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable result file ({type(err).__name__})") from None
    if not isinstance(result, dict) or not isinstance(result.get("runs"), list) or not result["runs"]:
        raise UserError(f"{path}: not a result file of finetune.py (no per-seed runs)")
    return result


def budget_of(result):
    """The label budget a result ran with, as finetune.py names it: '15pc' or 'r0.1'."""
    config = result.get("config") or {}
    ratio = config.get("train_ratio") or 0
    return f"r{ratio:g}" if ratio > 0 else f"{config.get('train_per_class')}pc"


def runs_by_seed(result):
    """{seed: run} of a result."""
    return {run["seed"]: run for run in result["runs"]}


def differences(mine, theirs):
    """What keeps two correctly named results of one cell (check_named) from being a
    like-for-like pair: other scene data, or other training pixels for a shared seed."""
    found = []
    if mine.get("scene_fingerprint") != theirs.get("scene_fingerprint"):
        found.append(f"scene data (fingerprint) {mine.get('scene_fingerprint')} vs {theirs.get('scene_fingerprint')}")
    a, b = runs_by_seed(mine), runs_by_seed(theirs)
    for seed in sorted(set(a) & set(b)):
        if sorted(a[seed].get("train") or []) != sorted(b[seed].get("train") or []):
            found.append(f"seed {seed} trained on different pixels")
            break
    return found


def check_named(path, result, method, split, budget, protocol):
    """Refuse a result that is not the cell its file name says (another method, split, budget
    or protocol saved under this name)."""
    expected = {"method": method, "split": split, "label budget": f"{budget}pc",
                "protocol": protocol_of(method, protocol)}
    found = {"method": result.get("method"), "split": result.get("split"), "label budget": budget_of(result),
             "protocol": result.get("protocol")}
    for what in expected:
        if found[what] != expected[what]:
            raise UserError(f"{path}: holds a result with {what} {found[what]}, but its name says "
                            f"{expected[what]}; run python -m utils.table again for this cell")


def paired_oa(mine_path, mine, theirs_path, theirs):
    """Per-seed OA differences in points (mine - theirs) over the seeds both have, refused
    unless the two results are a like-for-like pair."""
    differ = differences(mine, theirs)
    if differ:
        raise UserError(f"{mine_path} and {theirs_path} are not a like-for-like pair: {'; '.join(differ)}; "
                        f"run both again with python -m utils.table")
    a, b = runs_by_seed(mine), runs_by_seed(theirs)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise UserError(f"{mine_path} and {theirs_path} have no seed in common (seeds {sorted(a)} vs {sorted(b)}); "
                        f"run both with the same --seeds")
    return np.array([100 * (a[s]["scores"]["oa"] - b[s]["scores"]["oa"]) for s in seeds])


def other_methods(cfg):
    """--others as a list; "" = utils.table's default methods but --method itself."""
    if not cfg["others"].strip():
        return [m for m in TABLE_DEFAULTS["methods"].split(",") if m != cfg["method"]]
    others = comma_list(cfg, "others")
    unknown = [m for m in others if m not in CHOICES["method"]]
    if unknown:
        raise UserError(f"--others: unknown {', '.join(unknown)}; valid: {', '.join(CHOICES['method'])}")
    if cfg["method"] in others:
        raise UserError(f"--others={cfg['others']}: includes --method={cfg['method']} itself")
    return others


def main(argv):
    cfg = resolve_config(DEFAULTS, argv, choices=CHOICES)
    cfg["dataset"] = scene_name(cfg["dataset"])  # "salinasa" -> "SalinasA", before any path is built
    others, splits, budgets = other_methods(cfg), parse_splits(cfg), parse_budgets(cfg)
    folder = Path(cfg["results_dir"]) / cfg["dataset"]
    lines = ["| comparison | split | labels/class | OA difference, points (mean ± std over seeds) | seeds won |",
             "|---|---|---|---|---|"]
    for split in splits:
        for budget in budgets:
            mine_path = cell_path(folder, cfg["method"], split, budget, cfg["protocol"], cfg["tag"])
            mine = read_result(mine_path)
            for other in others:
                theirs_path = cell_path(folder, other, split, budget, cfg["protocol"], cfg["tag"])
                theirs = read_result(theirs_path)
                check_named(mine_path, mine, cfg["method"], split, budget, cfg["protocol"])
                check_named(theirs_path, theirs, other, split, budget, cfg["protocol"])
                diff = paired_oa(mine_path, mine, theirs_path, theirs)
                lines.append(f"| {cfg['method']} − {other} | {split} | {budget} | {diff.mean():+.2f} ± {diff.std():.2f} "
                             f"| {(diff > 0).sum()}/{len(diff)} |")
    text = "\n".join(lines) + "\n"
    out = folder / f"paired_{cfg['method']}{cfg['tag']}.md"
    write_text(out, text)
    print(text.rstrip())
    print(out)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
