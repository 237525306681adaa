"""Paired comparison of one method against the others, seed by seed, on the same splits.

    python -m utils.paired --dataset=IndianPinesSubset --method=pcl

Every method of a comparison table ran on the same train/test pixels for a given seed, so the
per-seed OA difference removes the split-to-split variation that dominates the std of each
method alone. Reads results/<dataset>/*.json written by utils.table; prints a Markdown table
(mean difference in OA points +- std over seeds, and on how many seeds the method won) and
writes it to results/<dataset>/paired_<method>.md.
"""
import json
import sys
from pathlib import Path

import numpy as np

from utils.config import resolve_config
from utils.errors import UserError, run_main
from utils.fileio import write_text
from utils.table import PRETRAIN_MODE

DEFAULTS = {"dataset": "IndianPinesSubset", "method": "pcl", "others": "svm,svm_spatial,supervised,simclr,nsmm,pcl+nsmm",
            "budgets": "5,10,15", "splits": "random,disjoint", "protocol": "linear", "results_dir": "results"}


def oa_by_seed(folder, method, split, budget, protocol):
    """{seed: OA} of one table cell."""
    proto = protocol if method in PRETRAIN_MODE else "baseline"
    path = Path(folder) / f"{method}_{proto}_{split}_{budget}pc.json"
    if not path.exists():
        raise UserError(f"{path}: no such result; run python -m utils.table first")
    return {run["seed"]: run["scores"]["oa"] for run in json.loads(path.read_text())["runs"]}


def main(argv):
    cfg = resolve_config(DEFAULTS, argv)
    folder = Path(cfg["results_dir"]) / cfg["dataset"]
    lines = [f"| comparison | split | labels/class | OA difference, points (mean ± std over seeds) | seeds won |",
             "|---|---|---|---|---|"]
    for split in cfg["splits"].split(","):
        for budget in cfg["budgets"].split(","):
            mine = oa_by_seed(folder, cfg["method"], split, budget, cfg["protocol"])
            for other in cfg["others"].split(","):
                theirs = oa_by_seed(folder, other, split, budget, cfg["protocol"])
                seeds = sorted(set(mine) & set(theirs))
                diff = np.array([100 * (mine[s] - theirs[s]) for s in seeds])
                lines.append(f"| {cfg['method']} − {other} | {split} | {budget} | {diff.mean():+.2f} ± {diff.std():.2f} "
                             f"| {(diff > 0).sum()}/{len(diff)} |")
    text = "\n".join(lines) + "\n"
    write_text(folder / f"paired_{cfg['method']}.md", text)
    print(text.rstrip())
    print(folder / f"paired_{cfg['method']}.md")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
