"""Issue 6 at the level of the two scripts: users' own scenes, bad files, interruptions, untrusted weights.

Every refused input must end pretrain_main.py / finetune.py with exit code 2 and ONE stderr
line `error: ...` naming the problem and the file, no traceback, and no output created or
changed. The scripts run as subprocesses where the real command line matters (end to end,
signals, crafted files) and in-process through `run_main` otherwise (same code path, without
paying the ~5 s torch start-up per case on a small CPU).

The scene is tiny and synthetic (24 x 24 pixels, 16 bands, 3 classes in spatial fields,
utils/make_synthetic_scene.py), the settings tiny (--preset=small --patch_size=5 ...).
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402
import pretrain_main  # noqa: E402
from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.errors import UserError, run_main  # noqa: E402
from utils.make_synthetic_scene import make_scene  # noqa: E402

TINY = ["--preset=small", "--patch_size=5", "--batch_size=32", "--epochs=2", "--threads=1"]
OUTPUT_DIRS = ("weights", "runs", "results")


# ----------------------------------------------------------------------------- helpers


def write_scene(folder, name="a", bands=16, seed=0, fmt="npy"):
    """Tiny scene files in `folder`; returns the --cube/--gt/--layout arguments for them."""
    folder.mkdir(parents=True, exist_ok=True)
    cube, gt, _ = make_scene(24, 24, bands, 3, noise=0.02, seed=seed)
    if fmt == "npy":
        np.save(folder / f"{name}_cube.npy", cube)
        np.save(folder / f"{name}_gt.npy", gt)
        return [f"--cube={folder / f'{name}_cube.npy'}", f"--gt={folder / f'{name}_gt.npy'}", "--layout=HWB"]
    # MAT v5 with named variables; the cube stored bands first, as some tools write it
    scipy.io.savemat(folder / f"{name}_cube.mat", {"data": cube.transpose(2, 0, 1), "wavelengths": np.arange(bands)})
    scipy.io.savemat(folder / f"{name}_gt.mat", {"labels": gt})
    return [f"--cube={folder / f'{name}_cube.mat'}:data", f"--gt={folder / f'{name}_gt.mat'}:labels", "--layout=BHW"]


def custom(scene_args, cache):
    return ["--dataset=custom", *scene_args, f"--cache_dir={cache}"]


def script_env(tmp):
    empty = Path(tmp) / "empty_data_dir"
    empty.mkdir(exist_ok=True)
    return {**os.environ, "HSI_DATA_DIR": str(empty), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def run_script(script, args, cwd, timeout=180):
    """Run ROOT/<script> with `args` in `cwd`; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=script_env(cwd),
                          capture_output=True, text=True, timeout=timeout)


def run_inproc(module, args, capsys):
    """module.main(args) through run_main in this process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = 0
    try:
        run_main(module.main, list(args))
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, f"exit code {code}, stderr: {err[-2000:]}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(folder):
    """{relative path: bytes} of every file under folder's output dirs."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes()
            for d in OUTPUT_DIRS if (folder / d).exists() for p in sorted((folder / d).rglob("*")) if p.is_file()}


def no_outputs(folder):
    return not any((Path(folder) / d).exists() for d in OUTPUT_DIRS)


class Evil:
    """Unpickling this creates the marker file: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_file(path, marker, legacy=False):
    state = {"model": {"w": torch.ones(2)}, "optimizer": Evil(marker), "epoch": 1, "config": {}, "log": "[]"}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(state, f)
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Scenes a (npy), b (other band count), c (same shape, other data) and a good pretrain on a."""
    base = tmp_path_factory.mktemp("robust")
    scenes = base / "scenes"
    e = {"base": base, "cache": base / "cache", "a": write_scene(scenes, "a"),
         "b": write_scene(scenes, "b", bands=12, seed=1), "c": write_scene(scenes, "c", seed=2)}
    work = base / "work"
    work.mkdir()
    proc = run_script("pretrain_main.py", custom(e["a"], e["cache"]) + TINY, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    e["work"] = work
    e["weights"] = work / "weights" / "custom" / "encoder.safetensors"
    assert e["weights"].is_file()
    return e


@pytest.fixture
def inproc_cwd(tmp_path, monkeypatch):
    """An empty working folder for in-process runs, with an empty $HSI_DATA_DIR."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("HSI_DATA_DIR", str(tmp_path / "empty"))
    return tmp_path


# ----------------------------------------------------------------------------- custom scene end to end


def test_custom_npy_pretrain_and_finetune(env):
    work = env["work"]
    log = (work / "runs" / "custom" / "encoder" / "log.txt").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2]
    umask = os.umask(0)
    os.umask(umask)
    assert env["weights"].stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600: shareable
    proc = run_script("finetune.py", ["--dataset=custom", *env["a"], "--train_per_class=5", "--threads=1"], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == ""
    last = proc.stdout.strip().splitlines()[-1]
    assert "OA" in last
    json_path = work / last.split()[-1]
    assert json_path.suffix == ".json" and json_path.is_file()
    result = json.loads(json_path.read_text())
    assert result["dataset"] == "custom" and result["weights"].endswith("encoder.safetensors")
    assert result["summary"]["oa"]["mean"] > 0.5


def test_custom_mat_pretrain_and_finetune(inproc_cwd, capsys):
    """MAT v5 files with named variables, the cube stored bands first (in-process: same code path)."""
    scene = write_scene(inproc_cwd / "scene", "m", fmt="mat")
    code, out, err = run_inproc(pretrain_main, custom(scene, inproc_cwd / "cache") + TINY + ["--max_steps=3"], capsys)
    assert code == 0, err
    assert "scene custom: 24 x 24 pixels, 16 bands, 3 classes" in out
    assert (inproc_cwd / "weights" / "custom" / "encoder.safetensors").is_file()
    code, out, err = run_inproc(finetune, ["--dataset=custom", *scene, "--train_per_class=5", "--threads=1",
                                           "--save_map=false"], capsys)
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert "OA" in last and (inproc_cwd / last.split()[-1]).is_file()


def test_small_classes_give_half_and_say_so(env, inproc_cwd, capsys):
    """Decision: a class with fewer than twice --train_per_class pixels trains on half of them,
    and the run says so (printed `note:` and in the JSON), rather than failing."""
    code, out, err = run_inproc(finetune, ["--dataset=custom", *env["a"], f"--weights={env['weights']}",
                                           "--train_per_class=100000", "--threads=1", "--save_map=false"], capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 3 and all("(half of the class)" in n and "instead of 100000" in n for n in notes)
    result = json.loads(Path(out.strip().splitlines()[-1].split()[-1]).read_text())
    assert len(result["notes"]) == 3


# ----------------------------------------------------------------------------- refused inputs


def _bad_files(kind, folder):
    """(scene arguments, words the error must contain) for one kind of bad input."""
    folder.mkdir(parents=True, exist_ok=True)
    cube, gt, _ = make_scene(24, 24, 16, 3, seed=0)
    np.save(folder / "cube.npy", cube)
    np.save(folder / "gt.npy", gt)
    good_cube, good_gt = f"--cube={folder / 'cube.npy'}", f"--gt={folder / 'gt.npy'}"

    def with_gt(arr):
        np.save(folder / "bad_gt.npy", arr)
        return [good_cube, f"--gt={folder / 'bad_gt.npy'}"], ["bad_gt.npy"]

    if kind == "missing cube":
        return ["--cube=nowhere/cube.npy", good_gt], ["nowhere/cube.npy", "file not found", "looked for /"]
    if kind == "missing gt":
        return [good_cube, f"--gt={folder / 'no_gt.mat'}:gt"], ["no_gt.mat", "file not found"]
    if kind == "wrong key":
        scipy.io.savemat(folder / "cube.mat", {"data": cube, "bands": np.arange(16.0)})
        return [f"--cube={folder / 'cube.mat'}:cube", good_gt], ["cube.mat", "no array named 'cube'", "'data'",
                                                                  "'bands'"]
    if kind == "not a mat":
        (folder / "cube.mat").write_text("this is a CSV export, not MATLAB\n1,2,3\n")
        return [f"--cube={folder / 'cube.mat'}", good_gt], ["cube.mat", "not a MATLAB"]
    if kind == "truncated mat":
        scipy.io.savemat(folder / "cube.mat", {"data": cube}, do_compression=False)
        data = (folder / "cube.mat").read_bytes()
        (folder / "cube.mat").write_bytes(data[:len(data) // 2])
        return [f"--cube={folder / 'cube.mat'}", good_gt], ["cube.mat", "cannot read"]
    if kind == "shape mismatch":
        np.save(folder / "small_gt.npy", gt[:20])
        return [good_cube, f"--gt={folder / 'small_gt.npy'}"], ["cube.npy", "small_gt.npy", "24 x 24", "20 x 24"]
    if kind == "nan in cube":
        bad = cube.copy()
        bad[3, 4, 5] = np.nan
        np.save(folder / "nan_cube.npy", bad)
        return [f"--cube={folder / 'nan_cube.npy'}", good_gt], ["nan_cube.npy", "1 NaN"]
    if kind == "negative labels":
        args, words = with_gt(np.where(gt == 2, -1, gt.astype(np.int16)))
        return args, words + ["negative"]
    if kind == "fractional labels":
        args, words = with_gt(np.where(gt == 2, 1.5, gt).astype(np.float32))
        return args, words + ["non-integer"]
    if kind == "nan labels":
        args, words = with_gt(np.where(gt == 2, np.nan, gt).astype(np.float64))
        return args, words + ["non-integer"]
    if kind == "single pixel class":
        lone = gt.copy()
        lone[lone == 3] = 0
        lone[0, 0] = 3
        args, words = with_gt(lone)
        return args, words + ["class 3", "1 labelled pixel"]
    if kind == "class names":
        (folder / "names.json").write_text('["water", "soil"]')
        return [good_cube, good_gt, f"--class_names={folder / 'names.json'}"], ["names.json", "3 class names"]
    raise ValueError(kind)


BAD_FILES = ["missing cube", "missing gt", "wrong key", "not a mat", "truncated mat", "shape mismatch",
             "nan in cube", "negative labels", "fractional labels", "nan labels", "single pixel class",
             "class names"]


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_scene_files(kind, inproc_cwd, capsys):
    args, words = _bad_files(kind, inproc_cwd / "in")
    # pretraining and evaluation read scenes through the same checks; alternate to cover both
    module = pretrain_main if BAD_FILES.index(kind) % 2 == 0 else finetune
    extra = TINY + [f"--cache_dir={inproc_cwd / 'cache'}"] if module is pretrain_main else ["--threads=1",
                                                                                         "--method=svm"]
    code, _, err = run_inproc(module, ["--dataset=custom", "--layout=HWB", *args, *extra], capsys)
    assert_one_line_error(code, err, *words)
    assert no_outputs(inproc_cwd)


def test_known_scene_missing_without_download(inproc_cwd, capsys):
    code, _, err = run_inproc(finetune, ["--dataset=IndianPines", "--method=svm", "--download=false"], capsys)
    assert_one_line_error(code, err, "Indian_pines_corrected.mat", "not found", f"looked in {inproc_cwd / 'empty'}",
                          "curl -L -o", "http")
    assert no_outputs(inproc_cwd)


def test_finetune_looks_for_the_weights_before_loading_or_downloading_the_scene(inproc_cwd, capsys):
    code, _, err = run_inproc(finetune, ["--dataset=paviau", "--method=pcl"], capsys)  # PaviaU: a 34 MB download
    assert_one_line_error(code, err, "weights/PaviaU/pcl.safetensors", "no encoder weights there",
                          "run pretrain_main.py first")
    assert no_outputs(inproc_cwd) and not (inproc_cwd / "datasets").exists()


def test_dataset_names_in_any_case_make_one_folder_per_scene(env, inproc_cwd, capsys):
    """--dataset=CUSTOM writes weights/custom/ (the scene's proper name), so finetune.py with the
    proper name finds it; two spellings never make two folders."""
    code, _, err = run_inproc(pretrain_main, ["--dataset=CUSTOM", *env["a"], f"--cache_dir={env['cache']}",
                                              *TINY, "--epochs=1", "--max_steps=1"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (inproc_cwd / "weights").iterdir()) == ["custom"]
    code, out, err = run_inproc(finetune, ["--dataset=Custom", *env["a"], "--save_map=false"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (inproc_cwd / "results").iterdir()) == ["custom"]


def test_results_of_two_encoder_files_keep_apart_and_no_stale_map_stays(env, inproc_cwd, capsys):
    default, other = inproc_cwd / "weights" / "custom" / "encoder.safetensors", inproc_cwd / "other.safetensors"
    default.parent.mkdir(parents=True)
    for path in (default, other):
        path.write_bytes(env["weights"].read_bytes())
    scene = ["--dataset=custom", *env["a"]]
    for args in ([], [f"--weights={other}"]):
        code, _, err = run_inproc(finetune, [*scene, *args], capsys)
        assert code == 0, err
    results = inproc_cwd / "results" / "custom"
    assert (results / "encoder_linear_random_15pc.json").is_file()
    assert (results / "encoder-other_linear_random_15pc.json").is_file()  # named after the weights file
    assert (results / "encoder-other_linear_random_15pc_map.png").is_file()
    code, out, err = run_inproc(finetune, [*scene, f"--weights={other}", "--save_map=false"], capsys)
    assert code == 0, err
    assert not (results / "encoder-other_linear_random_15pc_map.png").exists()  # not beside the new results
    assert not (results / "encoder-other_linear_random_15pc_prediction.png").exists()
    assert "removed" in out and (results / "encoder_linear_random_15pc_map.png").is_file()


@pytest.mark.parametrize("module,setting,args", [(pretrain_main, "--run_dir", []), (pretrain_main, "--cache_dir", []),
                                                 (finetune, "--results_dir", ["--method=svm"])])
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(module, setting, args, inproc_cwd, capsys):
    (inproc_cwd / "taken").write_text("a file")
    code, out, err = run_inproc(module, ["--dataset=SalinasA", f"{setting}=taken/sub", *args], capsys)
    assert_one_line_error(code, err, f"{setting}=taken/sub", "taken is a file, not a folder")
    assert "SLIC" not in out and "scene" not in out and no_outputs(inproc_cwd)  # nothing loaded or written


def test_nsmm_with_one_pseudolabel_is_refused_and_pcl_with_one_superpixel_says_so(env, inproc_cwd, capsys):
    """One superpixel (a small scene, the default 200 pixels per segment or more) gives every
    pixel one pseudolabel: NSMM would eliminate every negative, a loss of exactly 0 and nothing
    trained (it used to run so, silently); PCL's weights are then all 1, plain SimCLR."""
    scene = custom(env["a"], inproc_cwd / "cache") + TINY + ["--epochs=1", "--max_steps=1",
                                                             "--slic_pixels_per_segment=10000"]
    for mode in ("nsmm", "pcl+nsmm"):
        code, _, err = run_inproc(pretrain_main, scene + [f"--negatives={mode}", "--pseudo_k=3"], capsys)
        assert_one_line_error(code, err, f"--negatives={mode}", "1 superpixel(s)", "eliminate every negative",
                              "--slic_pixels_per_segment (now 10000)")
    code, out, err = run_inproc(pretrain_main, scene + ["--negatives=pcl"], capsys)
    assert code == 0, err
    assert "note: one superpixel: every PCL weight is 1, so this is plain SimCLR" in out


@pytest.mark.parametrize("module,args", [(pretrain_main, []), (finetune, ["--method=svm"])])
def test_a_mistyped_data_folder_is_refused_not_created(module, args, inproc_cwd, capsys):
    code, _, err = run_inproc(module, ["--dataset=SalinasA", "--data_dir=dtaa", *args], capsys)
    assert_one_line_error(code, err, "--data_dir=dtaa", "no such folder")
    assert not (inproc_cwd / "dtaa").exists() and no_outputs(inproc_cwd)


@pytest.mark.parametrize("module", [pretrain_main, finetune])
def test_help_lists_every_setting_with_its_default_and_comment(module, inproc_cwd, capsys):
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    for name in module.SETTINGS:
        assert f"--{name} " in out, name
    assert ("labelled pixels per class" if module is finetune else "older GPUs and the CPU run float32") in out
    assert no_outputs(inproc_cwd)


@pytest.mark.parametrize("module,args,words", [
    (pretrain_main, ["--epoch=3"], ["unknown setting --epoch", "did you mean --epochs", "valid settings:",
                                    "batch_size", "temperature"]),
    (finetune, ["--trian_per_class=3"], ["unknown setting --trian_per_class", "train_per_class", "seeds"]),
    (pretrain_main, ["--epochs=abc"], ["--epochs=abc", "integer"]),
    (pretrain_main, ["--lr=fast"], ["--lr=fast", "number"]),
    (finetune, ["--save_map=maybe"], ["--save_map=maybe", "true or false"]),
    (pretrain_main, ["--dataset=custom", "--gt=gt.npy"], ["--dataset=custom needs --cube"]),
    (finetune, ["--dataset=custom"], ["--dataset=custom needs --cube"]),
    (pretrain_main, ["--dataset=Mars"], ["--dataset=Mars", "IndianPines", "custom"]),
    (pretrain_main, ["epochs=3"], ["'epochs=3'", "--name=value"]),
    (pretrain_main, ["--patch_size=3"], ["--patch_size=3", "odd number >= 5"]),  # the encoder's minimum
    (pretrain_main, ["--patch_size=8"], ["--patch_size=8", "odd number >= 5"]),
    # values that would give a NaN loss, wrong views, a traceback or an untrained head
    (pretrain_main, ["--temperature=0"], ["--temperature=0", "> 0"]),
    (pretrain_main, ["--pcl_b=0"], ["--pcl_b=0", "> 0"]),
    (pretrain_main, ["--crop_min=1.5"], ["--crop_min=1.5", "(0, 1]"]),
    (pretrain_main, ["--jitter_p=-0.1"], ["--jitter_p=-0.1", "[0, 1]"]),
    (pretrain_main, ["--lr=-0.001"], ["--lr=-0.001", "> 0"]),
    (pretrain_main, ["--slic_pixels_per_segment=0"], ["--slic_pixels_per_segment=0", ">= 1"]),
    (pretrain_main, ["--max_steps=-1"], ["--max_steps=-1", ">= 0"]),
    (pretrain_main, ["--batch_size=1"], ["--batch_size=1", ">= 2"]),
    (pretrain_main, ["--weighting=pcl", "--negatives=all"], ["--weighting", "--negatives", "not both"]),
    (pretrain_main, ["--lr=inf"], ["--lr=inf", "> 0"]),  # infinite values fail every range
    (pretrain_main, ["--negatives=nsmm", "--n_hard=0", "--n_easy=0"], ["--n_hard=0 --n_easy=0", "keeps none",
                                                                       "--n_easy >= 1"]),
    (pretrain_main, ["--negatives=pcl+nsmm", "--pseudo_k=1"], ["--pseudo_k=1", "0 (the class count)", "one cluster"]),
    (finetune, ["--finetune_lr=inf"], ["--finetune_lr=inf", "> 0"]),
    (finetune, ["--finetune_batch_size=1"], ["--finetune_batch_size=1", "BatchNorm"]),
    (finetune, ["--finetune_epochs=0"], ["--finetune_epochs=0", ">= 1"]),
    (finetune, ["--probe_c=0"], ["--probe_c=0", "> 0"]),
    (finetune, ["--train_ratio=1.5"], ["--train_ratio=1.5", "[0, 1)"]),
    (finetune, ["--batch_size=0"], ["--batch_size=0", ">= 1"]),
    (finetune, ["--seeds=0,1,0"], ["--seeds=0,1,0", "twice"]),
])
def test_bad_settings(module, args, words, inproc_cwd, capsys):
    code, _, err = run_inproc(module, args, capsys)
    assert_one_line_error(code, err, *words)
    assert no_outputs(inproc_cwd)


def test_device_index_beyond_the_machine(monkeypatch):
    from utils.device import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine, as far as torch says
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"^--device=cuda:7: this machine has 1 CUDA device\(s\), cuda:0 to cuda:0$"):
        pick_device("cuda:7")
    assert pick_device("cuda:0") == torch.device("cuda", 0) and pick_device("cuda") == torch.device("cuda")


def test_bad_setting_on_the_real_command_line(tmp_path):
    proc = run_script("pretrain_main.py", ["--epoch=3"], tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, "unknown setting --epoch", "valid settings:")
    assert no_outputs(tmp_path)


# ----------------------------------------------------------------------------- weights of another run


@pytest.mark.parametrize("case", ["other band count", "other data", "other preset", "no weights"])
def test_finetune_refuses_mismatched_weights(case, env, inproc_cwd, capsys):
    weights = env["weights"]
    scene, extra, words = env["a"], [], [str(weights)]
    if case == "other band count":
        scene, words = env["b"], words + ["n_bands=16", "n_bands=12"]
    elif case == "other data":
        scene, words = env["c"], words + ["different data", "c_cube.npy"]
    elif case == "other preset":
        extra, words = ["--preset=paper"], words + ["'small'", "--preset=paper"]
    else:
        weights, words = Path("weights/custom/encoder.safetensors"), ["weights/custom/encoder.safetensors",
                                                                      "run pretrain_main.py first"]
    args = ["--dataset=custom", *scene, "--threads=1", *extra]
    if case != "no weights":
        args.append(f"--weights={weights}")
    code, _, err = run_inproc(finetune, args, capsys)
    assert_one_line_error(code, err, *words)
    assert no_outputs(inproc_cwd)


def test_failed_runs_leave_existing_outputs_alone(env, capsys, monkeypatch):
    """A second pretrain with the same --out_name that fails, early or late, changes no byte."""
    work = env["work"]
    before = snapshot(work)
    assert "weights/custom/encoder.safetensors" in before and "runs/custom/encoder/checkpoint.pt" in before
    # late failure (after SLIC and the model are built): resuming with another learning rate
    proc = run_script("pretrain_main.py", custom(env["a"], env["cache"]) + TINY + ["--lr=0.5"], work)
    assert_one_line_error(proc.returncode, proc.stderr, "runs/custom/encoder/checkpoint.pt", "--lr was 0.001, now 0.5",
                          "--resume=false")
    # early failure: a bad cube, same output names
    monkeypatch.chdir(work)
    args, _ = _bad_files("nan in cube", env["base"] / "bad")
    code, _, err = run_inproc(pretrain_main, ["--dataset=custom", "--layout=HWB", *args, *TINY,
                                              f"--cache_dir={env['cache']}"], capsys)
    assert_one_line_error(code, err, "nan_cube.npy")
    # another scene with the same band count must not silently continue this scene's checkpoint
    code, _, err = run_inproc(pretrain_main, custom(env["c"], env["cache"]) + TINY, capsys)
    assert_one_line_error(code, err, "runs/custom/encoder/checkpoint.pt", "another scene", "--resume=false")
    after = snapshot(work)
    assert after.keys() == before.keys()
    assert all(after[k] == before[k] for k in before), [k for k in before if after[k] != before[k]]
    assert not [p for p in work.rglob("*.tmp")]


# ----------------------------------------------------------------------------- untrusted files


@pytest.mark.parametrize("legacy", [False, True])
def test_load_checkpoint_refuses_crafted_pickle(legacy, tmp_path):
    marker = tmp_path / "PWNED"
    path = crafted_file(tmp_path / "checkpoint.pt", marker, legacy)
    with pytest.raises(UserError, match="refused") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_finetune_refuses_crafted_weights(env, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "PWNED"
    evil_pt = crafted_file(tmp_path / "evil.pt", marker)
    proc = run_script("finetune.py", ["--dataset=custom", *env["a"], f"--weights={evil_pt}", "--threads=1"], tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, str(evil_pt), "never unpickled")
    assert not marker.exists() and no_outputs(tmp_path)
    # the same bytes under a .safetensors name, in-process (a marker here would be this process's doing)
    evil_st = tmp_path / "evil.safetensors"
    evil_st.write_bytes(evil_pt.read_bytes())
    monkeypatch.chdir(tmp_path)
    code, _, err = run_inproc(finetune, ["--dataset=custom", *env["a"], f"--weights={evil_st}"], capsys)
    assert_one_line_error(code, err, str(evil_st), "not a readable safetensors")
    assert not marker.exists() and no_outputs(tmp_path)


def test_pretrain_refuses_crafted_resume_checkpoint(env, inproc_cwd, capsys):
    """In-process on purpose: had the unpickler run the payload, this very process would make the marker."""
    marker = inproc_cwd / "PWNED"
    run_dir = inproc_cwd / "runs" / "custom" / "evil"
    run_dir.mkdir(parents=True)
    crafted_file(run_dir / "checkpoint.pt", marker)
    before = (run_dir / "checkpoint.pt").read_bytes()
    code, _, err = run_inproc(pretrain_main, custom(env["a"], env["cache"]) + TINY + ["--out_name=evil"], capsys)
    assert_one_line_error(code, err, "runs/custom/evil/checkpoint.pt", "refused")
    assert not marker.exists()
    assert not (inproc_cwd / "weights").exists() and (run_dir / "checkpoint.pt").read_bytes() == before


# ----------------------------------------------------------------------------- interruptions


def test_sigterm_keeps_checkpoint_and_resume_finishes(env, tmp_path):
    # only the 47 unlabelled pixels: one step of 32 per epoch, so epochs are short
    args = custom(env["a"], env["cache"]) + ["--preset=small", "--patch_size=5", "--batch_size=32", "--threads=1",
                                             "--pretrain_pool=exclude_test", "--out_name=sig"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain_main.py"), *args, "--epochs=200"], cwd=tmp_path,
                            env=script_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, proc.kill)  # a silent hang ends the read loop below, not the suite
    watchdog.start()
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith('{"epoch": 1'):
                break
        else:
            pytest.fail(f"no first epoch (ended, or killed after 120 s): {''.join(seen)[-2000:]} "
                        f"{proc.stderr.read()[-2000:]}")
        watchdog.cancel()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted:") and "--resume=true" in lines[0]
    run_dir = tmp_path / "runs" / "custom" / "sig"
    state = load_checkpoint(run_dir / "checkpoint.pt")
    done = state["epoch"]
    assert 1 <= done < 200
    assert len(json.loads(state["log"])) == done
    assert len((run_dir / "log.txt").read_text().splitlines()) == done
    assert not (tmp_path / "weights").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    # --resume=true is the default: continue to the (shortened) end
    again = run_script("pretrain_main.py", args + [f"--epochs={done + 1}"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from runs/custom/sig/checkpoint.pt at epoch {done}" in again.stdout
    from utils.checkpoint import read_encoder_file
    _, meta = read_encoder_file(tmp_path / "weights" / "custom" / "sig.safetensors")
    assert [r["epoch"] for r in meta["log"]] == list(range(1, done + 2))


def test_max_steps_cut_epoch_is_logged_as_partial_and_never_checkpointed(env, inproc_cwd, capsys):
    """576 pixels, batch 32: 18 steps an epoch. Stopping after 20 steps ends epoch 2 at step 2:
    the checkpoint stays at epoch 1, so resuming reruns epoch 2 whole instead of skipping 16 steps."""
    args = custom(env["a"], inproc_cwd / "cache") + TINY + ["--out_name=cut"]
    code, _, err = run_inproc(pretrain_main, args + ["--max_steps=20"], capsys)
    assert code == 0, err
    from utils.checkpoint import read_encoder_file
    log = read_encoder_file("weights/custom/cut.safetensors")[1]["log"]
    assert [r["epoch"] for r in log] == [1, 2]
    assert "steps" not in log[0] and (log[1]["steps"], log[1]["of_steps"]) == (2, 18)
    state = load_checkpoint("runs/custom/cut/checkpoint.pt")
    assert state["epoch"] == 1 and len(json.loads(state["log"])) == 1
    assert len(Path("runs/custom/cut/log.txt").read_text().splitlines()) == 1
    code, out, err = run_inproc(pretrain_main, args, capsys)  # --epochs=2, no step limit
    assert code == 0, err
    assert "resumed from runs/custom/cut/checkpoint.pt at epoch 1" in out
    log = read_encoder_file("weights/custom/cut.safetensors")[1]["log"]
    assert [r["epoch"] for r in log] == [1, 2] and "steps" not in log[1]


def test_resumed_run_is_bit_identical(env, inproc_cwd, capsys):
    """E epochs in one go == k epochs, then resumed to E (CPU, fixed seed): every tensor equal."""
    args = custom(env["a"], inproc_cwd / "cache") + [
        "--preset=small", "--patch_size=5", "--batch_size=16", "--threads=1", "--pretrain_pool=exclude_test",
        "--negatives=pcl+nsmm", "--seed=3", "--slic_pixels_per_segment=20"]
    # 47 unlabelled pixels: 2 steps per epoch; pcl+nsmm uses the order, view and mining generators
    for extra in (["--epochs=3", "--out_name=whole"], ["--epochs=1", "--out_name=parts"],
                  ["--epochs=3", "--out_name=parts"]):
        code, out, err = run_inproc(pretrain_main, args + extra, capsys)
        assert code == 0, err
    assert "resumed from runs/custom/parts/checkpoint.pt at epoch 1" in out
    whole = load_file("weights/custom/whole.safetensors")
    parts = load_file("weights/custom/parts.safetensors")
    assert whole.keys() == parts.keys()
    different = [k for k in whole if not torch.equal(whole[k], parts[k])]
    assert not different, different[:5]
    # a changed training setting is refused instead of silently mixing two recipes
    code, _, err = run_inproc(pretrain_main, args + ["--epochs=4", "--out_name=parts", "--temperature=0.1"], capsys)
    assert_one_line_error(code, err, "runs/custom/parts/checkpoint.pt", "--temperature")
    # a refused resume leaves the run's files as they were (the pseudolabel map is written later)
    run_files = {p.name: p.read_bytes() for p in Path("runs/custom/parts").iterdir()}
    assert "pseudolabels.png" in run_files
    code, _, err = run_inproc(pretrain_main, args + ["--epochs=4", "--out_name=parts", "--pseudo_k=2"], capsys)
    assert_one_line_error(code, err, "runs/custom/parts/checkpoint.pt", "--pseudo_k")
    # fewer epochs than the checkpoint has done is refused too (the log would say more than the file)
    code, _, err = run_inproc(pretrain_main, args + ["--epochs=2", "--out_name=parts"], capsys)
    assert_one_line_error(code, err, "runs/custom/parts/checkpoint.pt", "3 epochs done", "--epochs=2")
    assert {p.name: p.read_bytes() for p in Path("runs/custom/parts").iterdir()} == run_files


WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from utils.fileio import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        for i in range(4000):
            f.write(bytes([i % 251]) * 65536)
            f.flush()
            if i == 3:
                print("writing", flush=True)
            time.sleep(0.005)
print("done", flush=True)
"""


@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_mid_write_never_leaves_a_partial_file(existing, tmp_path):
    target = tmp_path / "weights" / "custom" / "encoder.safetensors"
    target.parent.mkdir(parents=True)
    old = b"complete old file"
    if existing:
        target.write_bytes(old)
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if existing:
        assert target.read_bytes() == old
    else:
        assert not target.exists()
    # what a kill leaves is a hidden temporary beside the target, never a name a reader asks for
    leftovers = [p for p in target.parent.iterdir() if p != target]
    assert leftovers and all(p.name.startswith(".encoder.safetensors.") and p.name.endswith(".tmp")
                             for p in leftovers)
    assert sorted(target.parent.glob("*.safetensors")) == ([target] if existing else [])


def test_sigterm_outside_the_training_loop_cleans_up(tmp_path, capsys):
    """run_main turns SIGTERM into KeyboardInterrupt: a write in progress is removed, exit 130, one line."""
    from utils.fileio import atomic_path
    target = tmp_path / "results" / "x.json"

    def main(argv):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
            tmp.write_text("never")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        run_main(main, [], interrupted="interrupted: test")
    assert stop.value.code == 130
    assert capsys.readouterr().err == "interrupted: test\n"
    assert not target.exists() and list(target.parent.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before
