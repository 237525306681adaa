"""utils.table and utils.paired: settings checked before any work, scene names in any case,
defaults that match the scripts', and paired differences only between like-for-like results."""
import json
import re
import shlex
from pathlib import Path

import pytest

import finetune
import pretrain_main
from utils import paired, table
from utils.errors import UserError
from utils.make_synthetic_scene import write_scene

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    """A tiny custom scene; the scripts run in tmp_path so weights/, runs/ and results/ land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HSI_DATA_DIR", str(tmp_path / "no_data_here"))
    cube, gt, names = write_scene(tmp_path / "toy", height=32, width=32, bands=12, n_classes=3, seed=1)
    return [f"--cube={cube}", f"--gt={gt}", f"--class_names={names}"]


@pytest.fixture()
def no_work(monkeypatch):
    """Pretraining or evaluating anything fails the test: the table must refuse before either."""
    def fail(argv):
        raise AssertionError(f"work started before the settings were checked: {argv}")
    monkeypatch.setattr(pretrain_main, "main", fail)
    monkeypatch.setattr(finetune, "main", fail)


def table_args(toy, *extra):
    """A small table on the toy scene: an encoder and a baseline, one budget, one seed."""
    return ["--dataset=custom", "--methods=simclr,svm", "--budgets=3", "--splits=random", "--seeds=0",
            "--epochs=1", "--batch_size=32", "--threads=2",
            f"--pretrain_args={' '.join(toy + ['--patch_size=7', '--max_steps=1', '--cache_dir=cache'])}",
            f"--finetune_args={' '.join(toy)}", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--protocol=fintune"], r"^--protocol=fintune: expected one of linear, finetune$"),
    (["--splits=random,disjiont"], r"^--splits: unknown disjiont; valid: random, disjoint$"),
    (["--budgets=5,x"], r"^--budgets=5,x: expected whole numbers >= 1"),
    (["--budgets=0"], r"^--budgets=0: expected whole numbers >= 1"),
    (["--budgets=5,5"], r"^--budgets=5,5: 5 is given twice$"),
    (["--seeds=0,1,0"], r"^--seeds=0,1,0: a seed is given twice"),
    (["--seeds=a-b"], r"^--seeds=a-b: expected a list like"),
    (["--methods=simclr,pcl,pcl"], r"^--methods=simclr,pcl,pcl: pcl is given twice$"),
    (["--finetune_epochs=0"], r"^--finetune_epochs=0: expected an integer >= 1$"),
    (["--lr=0"], r"^--lr=0.0: expected a number > 0$"),
    (["--preset=huge"], r"^--preset=huge: expected one of"),
    (["--dataset=nowhere"], r"^--dataset=nowhere: unknown scene"),
    (["--methods=simclr,nsmm", "--pretrain_args={toy} --n_hard=0 --n_easy=0"], r"^--negatives=nsmm keeps n_hard"),
    (["--finetune_args=--probe_c=-1"], r"^--probe_c=-1.0: expected a number > 0$"),
    # what the table sets for each cell or encoder would be overridden and the cell mislabelled
    (["--finetune_args={toy} --split=disjoint"], r"^--finetune_args: --split is set by the table itself for "
                                                 r"each cell; use the table's --splits$"),
    (["--finetune_args={toy} --train-ratio=0.1"], r"^--finetune_args: --train_ratio is set by the table"),
    (["--pretrain_args={toy} --epochs=3"], r"^--pretrain_args: --epochs is set by the table itself for each "
                                           r"encoder; use the table's --epochs$"),
])
def test_table_refuses_bad_settings_before_pretraining_anything(toy, no_work, extra, message):
    """Each of these used to pretrain every encoder first (or, for --budgets=5,x, end in a
    ValueError traceback): now one line, and nothing is pretrained, evaluated or written."""
    with pytest.raises(UserError, match=message):
        table.main(table_args(toy) + [e.replace("{toy}", " ".join(toy)) for e in extra])
    assert sorted(p.name for p in Path(".").iterdir()) == ["toy"]


def test_table_refuses_a_missing_cube_for_the_cells_before_pretraining(toy, no_work):
    """finetune.py's scene (--finetune_args) is loaded before the encoders are pretrained."""
    args = [a for a in table_args(toy) if not a.startswith("--finetune_args=")]
    with pytest.raises(UserError, match=r"--dataset=custom needs --cube"):
        table.main(args)


def test_table_refuses_a_stale_encoder_before_pretraining_the_others(toy, monkeypatch):
    """pcl's file was pretrained with --epochs=1; a table with --epochs=2 refuses it before it
    pretrains simclr, not after."""
    cfg = dict(table.DEFAULTS, dataset="custom", epochs=1, batch_size=32, threads=2,
               pretrain_args=" ".join(toy + ["--patch_size=7", "--max_steps=1", "--cache_dir=cache"]))
    table.pretrain_if_missing(cfg, "pcl")
    pretrained = []
    monkeypatch.setattr(pretrain_main, "main", lambda argv: pretrained.append(argv))
    args = [a.replace("--methods=simclr,svm", "--methods=simclr,pcl").replace("--epochs=1", "--epochs=2")
            for a in table_args(toy)]
    with pytest.raises(UserError, match=r"pcl.safetensors: pretrained with other settings.*--epochs was 1, now 2"):
        table.main(args)
    assert pretrained == []


def test_table_and_paired_take_the_scene_name_in_any_case(toy, capsys):
    """--dataset=CUSTOM writes and reads results/custom/, the folder finetune.py writes to."""
    args = [a.replace("--methods=simclr,svm", "--methods=svm,svm_spatial").replace("--dataset=custom", "--dataset=CUSTOM")
            for a in table_args(toy)]
    table.main(args)
    assert Path("results/custom/table.md").exists() and not Path("results/CUSTOM").exists()
    paired.main(["--dataset=Custom", "--method=svm", "--others=svm_spatial", "--budgets=3", "--splits=random"])
    assert Path("results/custom/paired_svm.md").exists()


def test_table_splits_the_baselines_with_the_encoders_patch_size(toy, no_work):
    """The disjoint split's margin is the patch size: with --pretrain_args=--patch_size=7 the
    baselines ran with finetune.py's 15, so their disjoint splits were not the encoders'."""
    cfg = dict(table.DEFAULTS, dataset="custom", pretrain_args="--patch_size=7")
    for method in ("svm", "svm_spatial", "supervised"):  # encoders split with the size in their file
        argv = table.cell_argv(cfg, method, "disjoint", 3, "x")
        assert table.resolve_config({k: getattr(finetune, k) for k in finetune.SETTINGS}, argv)["patch_size"] == 7
    # a baseline patch size other than the encoders' is refused up front when a split is disjoint
    args = [a.replace("--splits=random", "--splits=random,disjoint") for a in table_args(toy)]
    args = [a + " --patch_size=9" if a.startswith("--finetune_args=") else a for a in args]
    with pytest.raises(UserError, match=r"^--finetune_args: --patch_size=9 for the baselines, but the encoders "
                                        r"are pretrained with --patch_size=7"):
        table.main(args)


def test_table_defaults_are_the_scripts_own():
    """What the table passes to the scripts itself defaults to the scripts' own settings."""
    assert table.DEFAULTS["epochs"] == pretrain_main.epochs
    assert table.DEFAULTS["lr"] == pretrain_main.lr
    assert table.DEFAULTS["batch_size"] == pretrain_main.batch_size
    assert table.DEFAULTS["preset"] == pretrain_main.preset
    assert table.DEFAULTS["finetune_epochs"] == finetune.finetune_epochs
    assert paired.DEFAULTS["dataset"] == table.DEFAULTS["dataset"]


def test_make_table_runs_the_readme_results_command():
    """`make table` reproduces the README's Results rows (their command, for the default scene)."""
    make = re.search(r"^table:.*\n\t\$\(PY\) -m utils\.table (.*)$", (ROOT / "Makefile").read_text(), re.M)
    readme = re.search(r"python -m utils\.table --dataset=SalinasA (.*)$", (ROOT / "README.md").read_text(), re.M)
    assert make and readme
    assert shlex.split(make.group(1)) == ["--dataset=$(DATASET)"] + shlex.split(readme.group(1))


# ---------------------------------------------------------------- utils.paired

def write_result(method, split="random", budget=3, protocol="linear", seeds=(0, 1), tag="", name=None,
                 train_offset=0, fingerprint="f1", oa=0.8):
    """A result JSON as finetune.py writes it, under utils.table's name for the cell (or `name`)."""
    proto = protocol if method in table.PRETRAIN_MODE else "baseline"
    runs = [{"seed": s, "scores": {"oa": oa + 0.01 * s}, "train": [s, s + 10 + train_offset], "test": [50, 51]}
            for s in seeds]
    result = {"dataset": "custom", "method": method, "protocol": proto, "split": split,
              "scene_fingerprint": fingerprint, "runs": runs,
              "config": {"method": method, "protocol": protocol, "split": split, "train_per_class": budget,
                         "train_ratio": 0.0}}
    path = Path("results/custom") / f"{name or f'{method}_{proto}_random_3pc'}{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return path


def run_paired(*extra):
    paired.main(["--dataset=custom", "--others=svm", "--budgets=3", "--splits=random", *extra])


def test_paired_reads_tagged_results(tmp_path, monkeypatch):
    """--tag as in utils.table: the _paper files, and paired_pcl_paper.md beside them; the
    untagged pair is still read without it (and a like-for-like pair is not refused)."""
    monkeypatch.chdir(tmp_path)
    write_result("pcl", oa=0.9)
    write_result("svm", oa=0.8)
    write_result("pcl", tag="_paper", oa=0.7)
    write_result("svm", tag="_paper", oa=0.8)
    run_paired("--tag=_paper")
    assert "| pcl − svm | random | 3 | -10.00 ± 0.00 | 0/2 |" in Path("results/custom/paired_pcl_paper.md").read_text()
    run_paired()
    assert "| pcl − svm | random | 3 | +10.00 ± 0.00 | 2/2 |" in Path("results/custom/paired_pcl.md").read_text()


@pytest.mark.parametrize("theirs, message", [
    (dict(train_offset=1), r"seed 0 trained on different pixels"),
    (dict(fingerprint="f2"), r"scene data \(fingerprint\) f1 vs f2"),
])
def test_paired_refuses_results_that_are_not_a_pair(tmp_path, monkeypatch, theirs, message):
    """Two results of one cell made on other pixels or other data were compared as if paired."""
    monkeypatch.chdir(tmp_path)
    write_result("pcl")
    write_result("svm", **theirs)
    with pytest.raises(UserError, match=r"^results/custom/pcl_linear_random_3pc.json and "
                                        r"results/custom/svm_baseline_random_3pc.json are not a like-for-like "
                                        r"pair: " + message):
        run_paired()
    assert not Path("results/custom/paired_pcl.md").exists()


@pytest.mark.parametrize("theirs, message", [
    (dict(split="disjoint"), r"split disjoint, but its name says random"),
    (dict(budget=5), r"label budget 5pc, but its name says 3pc"),
    (dict(protocol="finetune", name="simclr_linear_random_3pc", method="simclr"),
     r"protocol finetune, but its name says linear"),
])
def test_paired_refuses_a_result_that_is_not_the_cell_its_name_says(tmp_path, monkeypatch, theirs, message):
    """A disjoint-split (other-budget, other-protocol) result under the random cell's name was
    compared as if it were that cell."""
    monkeypatch.chdir(tmp_path)
    write_result("pcl")
    method = theirs.pop("method", "svm")
    write_result(method, **theirs)
    with pytest.raises(UserError, match=rf"^results/custom/{method}_\w+_random_3pc.json: holds a result with "
                                        + message):
        run_paired(f"--others={method}")
    assert not Path("results/custom/paired_pcl.md").exists()


def test_paired_refuses_two_results_both_saved_under_the_wrong_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_result("pcl", split="disjoint")
    write_result("svm", split="disjoint")
    with pytest.raises(UserError, match=r"pcl_linear_random_3pc.json: holds a result with split disjoint, "
                                        r"but its name says random"):
        run_paired()


def test_paired_refuses_results_with_no_seed_in_common(tmp_path, monkeypatch):
    """It printed `+nan ± nan | 0/0`."""
    monkeypatch.chdir(tmp_path)
    write_result("pcl", seeds=(0, 1))
    write_result("svm", seeds=(2, 3))
    with pytest.raises(UserError, match=r"have no seed in common \(seeds \[0, 1\] vs \[2, 3\]\)"):
        run_paired()
