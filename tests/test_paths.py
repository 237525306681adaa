"""Bad output and data paths: one-line errors naming the path or setting, never a traceback,
and nothing created on the way (a mistyped --data_dir is not made and downloaded into)."""
import errno
import os
from pathlib import Path

import numpy as np
import pytest

import data.loading as loading
from utils import fileio
from utils.errors import UserError, run_main


def _run(capsys, main):
    """run_main(main) -> (exit code, stderr); exceptions other than SystemExit propagate."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_main(main, [])
    return stop.value.code, capsys.readouterr().err


def _one_line(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


# ----------------------------------------------------------------------------- run_main


def _raiser(kind, tmp_path):
    """A main() that fails the way a script does on a bad path, and the words its line must hold."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {
        # --data_dir=<file>: atomic_path's mkdir
        "mkdir over a file": (lambda: afile.mkdir(parents=True, exist_ok=True),
                              [afile, "it is a file, not a folder", "(File exists)"]),
        # --results_dir=<file>: results/<dataset> made after the work
        "folder below a file": (lambda: (afile / "SalinasA").mkdir(parents=True, exist_ok=True),
                                [afile / "SalinasA", f"{afile} is a file, not a folder", "(Not a directory)"]),
        "write below a file": (lambda: open(afile / "x.json", "w"),
                               [afile / "x.json", f"{afile} is a file, not a folder"]),
        "open a folder": (lambda: open(tmp_path, "w"), [tmp_path, "a folder, not a file", "(Is a directory)"]),
        "permission": (lambda: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied", str(afile))),
                       [afile, "(Permission denied)"]),
        "disk full": (lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", str(afile))),
                      [afile, "the disk is full (No space left on device)"]),
    }
    action, words = cases[kind]

    def main(argv):
        action()
    return main, words


@pytest.mark.parametrize("kind", ["mkdir over a file", "folder below a file", "write below a file",
                                  "open a folder", "permission", "disk full"])
def test_run_main_prints_path_errors_in_one_line(kind, tmp_path, capsys):
    main, words = _raiser(kind, tmp_path)
    _one_line(*_run(capsys, main), *words)


def test_run_main_keeps_tracebacks_for_bugs_only(capsys):
    def raising(exc):
        def main(argv):
            raise exc
        return main

    # a full disk names no file when a write fails: still one line
    _one_line(*_run(capsys, raising(OSError(errno.ENOSPC, "No space left on device"))), "No space left on device")
    # bugs and errors that name no path keep their traceback
    with pytest.raises(ValueError):
        run_main(raising(ValueError("a bug")), [])
    with pytest.raises(ConnectionResetError):
        run_main(raising(ConnectionResetError()), [])
    # unchanged: UserError and Ctrl-C
    _one_line(*_run(capsys, raising(UserError("--x=1: bad"))), "error: --x=1: bad")
    code, err = _run(capsys, raising(KeyboardInterrupt()))
    assert code == 130 and err.startswith("interrupted")


def test_finetune_results_dir_that_is_a_file(tmp_path, monkeypatch, capsys):
    """The user's case: --results_dir=<a file> ends in one line naming it, not NotADirectoryError."""
    import finetune
    from utils.make_synthetic_scene import write_scene
    monkeypatch.chdir(tmp_path)
    cube, gt, names = write_scene(tmp_path / "toy", height=32, width=32, bands=12, n_classes=3, seed=1)
    (tmp_path / "afile").write_text("x")
    args = ["--dataset=custom", f"--cube={cube}", f"--gt={gt}", "--method=svm", "--seeds=0", "--threads=1",
            "--results_dir=afile"]
    line = _one_line(*_run(capsys, lambda argv: finetune.main(args)), "afile")
    assert "is a file, not a folder" in line


# ----------------------------------------------------------------------------- check_output_dir


def test_check_output_dir_refuses_a_file_and_creates_nothing(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=f"^--results_dir=afile: {tmp_path / 'afile'} is a file, not a folder; move or rename it, or write elsewhere$"):
        fileio.check_output_dir(tmp_path / "afile", "--results_dir=afile")
    with pytest.raises(UserError, match=f"^--run_dir=x: {tmp_path / 'afile'} is a file, not a folder; move or rename it, or write elsewhere$"):
        fileio.check_output_dir(tmp_path / "afile" / "a" / "b", "--run_dir=x")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match="link is a broken link, not a folder"):
        fileio.check_output_dir(tmp_path / "link" / "SalinasA", "--cache_dir=link")
    before = _tree(tmp_path)
    fileio.check_output_dir(tmp_path, "--results_dir=.")  # an existing folder
    fileio.check_output_dir(tmp_path / "new" / "SalinasA", "--results_dir=new")  # made later, by the run
    assert _tree(tmp_path) == before


def test_check_output_dir_refuses_a_folder_it_cannot_write(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()
    # root may write anywhere, so the permission is simulated
    monkeypatch.setattr(fileio.os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    with pytest.raises(UserError, match=f"^--results_dir=ro: {tmp_path / 'ro'} is not writable; fix its permissions or write elsewhere$"):
        fileio.check_output_dir(tmp_path / "ro", "--results_dir=ro")
    with pytest.raises(UserError, match=f"cannot make {tmp_path / 'ro' / 'SalinasA'}: {tmp_path / 'ro'} is not"):
        fileio.check_output_dir(tmp_path / "ro" / "SalinasA", "--results_dir=ro")


# ----------------------------------------------------------------------------- data folder


def test_a_named_data_dir_that_does_not_exist_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HSI_DATA_DIR", raising=False)
    missing = tmp_path / "nonexistent"
    with pytest.raises(UserError, match=f"^--data_dir={missing}: no such folder; create it, or leave --data_dir "
                                        f"empty to use ./datasets$"):
        loading.check_data_dir(str(missing), "SalinasA")
    monkeypatch.setenv("HSI_DATA_DIR", str(missing))
    with pytest.raises(UserError, match=f"^HSI_DATA_DIR={missing}: no such folder; create it, or unset HSI_DATA_DIR"):
        loading.check_data_dir("", "SalinasA")
    with pytest.raises(UserError, match=rf"leave --data_dir empty to use \$HSI_DATA_DIR \({missing}\)"):
        loading.check_data_dir(str(tmp_path / "typo"), "SalinasA")
    loading.check_data_dir(str(missing), "custom")  # custom scenes read no data folder
    monkeypatch.delenv("HSI_DATA_DIR")
    assert loading.check_data_dir("", "SalinasA") == Path("datasets")  # the default may be made later
    assert _tree(tmp_path) == []


def test_a_data_dir_that_is_a_file_is_refused_before_downloading(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HSI_DATA_DIR", raising=False)
    (tmp_path / "afile").write_text("x")
    # with downloads allowed, the old code went on to make the folder: FileExistsError
    line = _one_line(*_run(capsys, lambda argv: loading.load_scene("SalinasA", data_dir=str(tmp_path / "afile"))),
                     f"--data_dir={tmp_path / 'afile'}: {tmp_path / 'afile'} is a file, not a folder")
    assert "File exists" not in line
    monkeypatch.setenv("HSI_DATA_DIR", str(tmp_path / "afile" / "sub"))
    with pytest.raises(UserError, match=f"^HSI_DATA_DIR={tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file"):
        loading.check_data_dir("", "IndianPines")
    assert _tree(tmp_path) == ["afile"]


# ----------------------------------------------------------------------------- custom labels


def test_a_lone_pixel_is_named_by_its_label_in_the_file(tmp_path):
    gt = np.repeat(np.arange(1, 6), 4).reshape(4, 5).astype(np.int32)  # labels 1..5, 4 pixels each
    gt = np.pad(gt, ((0, 1), (0, 0)))
    gt[4, 0] = 9  # one pixel labelled 9: class 6 after renumbering
    np.save(tmp_path / "gt.npy", gt)
    np.save(tmp_path / "cube.npy", np.ones((5, 5, 8), np.float32))
    with pytest.raises(UserError) as err:
        loading.load_scene("custom", cube=str(tmp_path / "cube.npy"), gt=str(tmp_path / "gt.npy"), layout="HWB")
    msg = str(err.value)
    assert "label 9 in the file" in msg and "class 6 ('class 6')" in msg and "1 labelled pixel" in msg, msg
