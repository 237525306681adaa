"""End to end: pretrain_main -> weights -> finetune, protocols, maps, the table command, NSMM pieces."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
import pretrain_main
from data.loading import load_scene
from data.patches import PatchCutter
from data.preprocess import standardise
from data.pseudolabels import (cached_superpixel_pseudolabels, pixel_pseudolabels, purity,
                               superpixel_pseudolabels)
from data.scenes import palette
from models.classifier import TwoHeadClassifier, train_classifier
from models.encoder import PCLEncoder, build_encoder
from utils.checkpoint import load_encoder, save_encoder
from utils.errors import UserError
from utils.make_synthetic_scene import write_scene

DATA = os.environ.get("HSI_DATA_DIR", "")
TINY = ["--preset=small", "--patch_size=7", "--batch_size=32", "--threads=2", "--cache_dir=cache"]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """Run the scripts in tmp_path so weights/, runs/ and results/ land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HSI_DATA_DIR", str(tmp_path / "no_data_here"))
    return tmp_path


@pytest.fixture()
def toy(workdir):
    cube, gt, names = write_scene(workdir / "toy", height=32, width=32, bands=12, n_classes=3, seed=1)
    return [f"--dataset=custom", f"--cube={cube}", f"--gt={gt}", f"--class_names={names}"]


def last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("OA "), out[-1]
    return json.loads(Path(out[-1].split()[-1]).read_text()), out


@pytest.mark.skipif(not DATA or not (Path(DATA) / "SalinasA_corrected.mat").exists(),
                    reason="HSI_DATA_DIR does not hold SalinasA_corrected.mat")
def test_salinas_a_pretrain_then_finetune_beats_chance(workdir, monkeypatch, capsys):
    monkeypatch.setenv("HSI_DATA_DIR", DATA)
    pretrain_main.main(["--dataset=SalinasA", "--epochs=1", "--max_steps=6", "--batch_size=128",
                        "--threads=2", f"--cache_dir={workdir / 'cache'}"])
    weights = workdir / "weights" / "SalinasA" / "encoder.safetensors"
    assert weights.exists()
    capsys.readouterr()
    finetune.main(["--dataset=SalinasA", "--seeds=0", "--threads=2", "--save_map=false"])
    result, lines = last_json(capsys)
    assert result["summary"]["oa"]["mean"] > 0.6  # chance is about 0.29 (largest class share)
    run = result["runs"][0]
    assert len(run["train"]) == 6 * 15 and len(set(run["train"]) & set(run["test"])) == 0
    assert result["config"]["train_per_class"] == 15 and run["seed"] == 0
    assert len(run["scores"]["confusion"]) == 6
    assert "results/SalinasA/encoder_linear_random_15pc.json" in lines[-1]


def test_encoder_round_trip_is_strict(tmp_path):
    torch.manual_seed(0)
    encoder = PCLEncoder(12, 7, "small").eval()
    path = tmp_path / "e.safetensors"
    save_encoder(path, encoder, {"dataset": "toy", "n_bands": 12})
    loaded, meta = load_encoder(path, build_encoder)
    loaded.eval()
    x = torch.randn(4, 12, 7, 7)
    assert torch.equal(encoder.features(x), loaded.features(x))
    assert meta["dataset"] == "toy" and meta["encoder_config"] == encoder.config


    class WithExtraKey:  # an encoder file with one tensor the architecture does not have
        config = encoder.config

        def state_dict(self):
            return {**encoder.state_dict(), "extra": torch.zeros(1)}

    save_encoder(tmp_path / "extra.safetensors", WithExtraKey(), {"dataset": "toy", "n_bands": 12})
    with pytest.raises(UserError, match=r"extra\.safetensors.*1 unexpected"):  # strict: refused, not ignored
        load_encoder(tmp_path / "extra.safetensors", build_encoder)


def test_linear_probe_leaves_encoder_bit_identical_and_finetune_changes_it(toy, capsys):
    pretrain_main.main(toy + TINY + ["--epochs=1", "--max_steps=2"])
    capsys.readouterr()
    weights = Path("weights/custom/encoder.safetensors")
    before = weights.read_bytes()
    finetune.main(toy + ["--seeds=0,1", "--train_per_class=5", "--save_map=false"])
    result, _ = last_json(capsys)
    assert weights.read_bytes() == before
    assert len(result["runs"]) == 2 and result["summary"]["oa"]["std"] >= 0

    # The frozen encoder's state (parameters and BatchNorm buffers) is the file's through the
    # whole probe: pixel map, feature extraction, fit, and predicting unlabelled pixels.
    scene = load_scene("custom", "", False, *[a.split("=", 1)[1] for a in toy[1:4]])
    digest = finetune.state_digest(load_encoder(weights, build_encoder)[0])
    config = {**{k: getattr(finetune, k) for k in finetune.SETTINGS}, "dataset": "custom"}
    evaluator = finetune.Evaluator(config, scene, standardise(scene.cube), torch.device("cpu"))
    train = np.flatnonzero(scene.gt.ravel() > 0)[::7]
    predict = evaluator.fit(train, scene.gt.ravel()[train], seed=0)
    unlabelled = np.flatnonzero(scene.gt.ravel() == 0)[:5]
    assert len(unlabelled) == 5 and predict(unlabelled).shape == (5,)
    assert finetune.state_digest(evaluator.encoder) == digest

    # The fine-tuning protocol trains the backbone.
    encoder, _ = load_encoder(weights, build_encoder)
    start = {k: v.clone() for k, v in encoder.state_dict().items()}
    cutter = PatchCutter(standardise(scene.cube), encoder.config["patch_size"])
    model = TwoHeadClassifier(encoder, scene.n_classes)
    steps = []
    train_classifier(model, cutter, train, scene.gt.ravel()[train], epochs=2, batch_size=16,
                     on_step=lambda: steps.append(1))
    assert len(steps) == 2 * sum(1 for s in range(0, len(train), 16) if len(train) - s >= 2)  # per step
    changed = [k for k, v in model.encoder.state_dict().items() if not torch.equal(v, start[k])]
    assert any("weight" in k for k in changed)


def test_finetune_protocol_and_disjoint_split_run(toy, capsys):
    pretrain_main.main(toy + TINY + ["--epochs=1", "--max_steps=2"])
    capsys.readouterr()
    finetune.main(toy + ["--protocol=finetune", "--finetune_epochs=2", "--split=disjoint",
                         "--train_per_class=3", "--save_map=false"])
    result, _ = last_json(capsys)
    assert result["protocol"] == "finetune" and result["split"] == "disjoint"
    assert any("disjoint split" in n for n in result["notes"])


def test_map_png_has_scene_size_and_only_palette_colours(toy, capsys):
    finetune.main(toy + ["--method=svm", "--train_per_class=5"])
    result, lines = last_json(capsys)
    png = Path("results/custom/svm_baseline_random_5pc_prediction.png")
    image = np.array(Image.open(png).convert("RGB"))
    assert image.shape[:2] == (32, 32)
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    allowed = {tuple(c) for c in palette(3)[1:]}  # every pixel predicted: no background colour
    assert colours <= allowed
    assert Path("results/custom/svm_baseline_random_5pc_map.png").exists()
    csv = Path("results/custom/svm_baseline_random_5pc_per_class.csv").read_text().splitlines()
    assert csv[0].startswith("class,name,train,test") and len(csv) == 4


def test_finetune_writes_no_map_when_a_later_seed_fails(toy, capsys, monkeypatch):
    """The first seed's maps are written with the results, after every seed ran: an error at the
    second seed leaves no output file (the README's promise for any refused run)."""
    real_split = finetune.make_split

    def split_failing_at_seed_1(gt, kind, per_class, seed, *args):
        if seed == 1:
            raise UserError("seed 1 cannot be split")
        return real_split(gt, kind, per_class, seed, *args)

    monkeypatch.setattr(finetune, "make_split", split_failing_at_seed_1)
    with pytest.raises(UserError, match="seed 1 cannot be split"):
        finetune.main(toy + ["--method=svm", "--train_per_class=5", "--seeds=0,1"])
    assert not Path("results").exists() or not any(Path("results").rglob("*"))
    finetune.main(toy + ["--method=svm", "--train_per_class=5", "--seeds=0,2"])  # the same run, no failure
    assert Path("results/custom/svm_baseline_random_5pc_map.png").exists()


def test_table_command_on_a_synthetic_scene(toy, capsys, monkeypatch):
    from utils import table
    # The table command pretrains with its own settings; keep them tiny.
    table_args = [f"--dataset=custom", "--methods=svm,simclr,pcl", "--budgets=3", "--splits=random,disjoint",
                  "--seeds=0-1", "--epochs=1", "--batch_size=32", "--threads=2",
                  f"--pretrain_args={' '.join(toy[1:] + ['--patch_size=7', '--max_steps=2', '--cache_dir=cache'])}",
                  f"--finetune_args={' '.join(toy[1:])}"]
    table.main(table_args)
    md = Path("results/custom/table.md").read_text()
    csv = Path("results/custom/table.csv").read_text().splitlines()
    assert "| pcl |" in md and "| svm |" in md
    assert len(csv) == 1 + 3 * 2
    assert Path("weights/custom/pcl.safetensors").exists() and Path("weights/custom/simclr.safetensors").exists()

    from utils import paired
    paired.main(["--dataset=custom", "--others=svm,simclr", "--budgets=3"])
    rows = Path("results/custom/paired_pcl.md").read_text().splitlines()[2:]
    assert len(rows) == 4 and all(r.endswith("/2 |") for r in rows)
    pcl = json.loads(Path("results/custom/pcl_linear_random_3pc.json").read_text())["runs"]
    svm = json.loads(Path("results/custom/svm_baseline_random_3pc.json").read_text())["runs"]
    expected = np.mean([100 * (a["scores"]["oa"] - b["scores"]["oa"]) for a, b in zip(pcl, svm)])
    assert f"{expected:+.2f}" in rows[0]

    # Run again with the same settings: every encoder and cell is kept as it is.
    cells = {p: p.read_bytes() for p in Path("results/custom").glob("*_3pc.json")}
    weights = {p: p.read_bytes() for p in Path("weights/custom").glob("*.safetensors")}
    capsys.readouterr()
    table.main(table_args)
    out = capsys.readouterr().out
    assert "running it again" not in out and "pretrained" not in out
    assert {p: p.read_bytes() for p in cells} == cells and {p: p.read_bytes() for p in weights} == weights
    # Other pretraining settings: the existing encoders are refused, not reused under the new label.
    with pytest.raises(UserError, match=r"pcl.safetensors.*--epochs was 1, now 2.*--force=true"):
        table.main([a.replace("--epochs=1", "--epochs=2").replace("--methods=svm,simclr,pcl", "--methods=pcl")
                    for a in table_args])
    # An encoder cut short by --max_steps is not the fully pretrained one.
    with pytest.raises(UserError, match=r"pcl.safetensors.*--max_steps was 2, now 0"):
        table.main([a.replace(" --max_steps=2", "").replace("--methods=svm,simclr,pcl", "--methods=pcl")
                    for a in table_args])
    # Other fine-tuning settings: the stale cells run again, the encoders stay.
    table.main([a.replace("--methods=svm,simclr,pcl", "--methods=svm").replace("--splits=random,disjoint",
                                                                              "--splits=random")
                for a in table_args] + ["--finetune_epochs=7"])
    out = capsys.readouterr().out
    assert "svm_baseline_random_3pc.json: out of date (--finetune_epochs was 100, now 7)" in out
    rerun = json.loads(Path("results/custom/svm_baseline_random_3pc.json").read_text())
    assert rerun["config"]["finetune_epochs"] == 7
    assert {p: p.read_bytes() for p in weights} == weights
    # The scene's files rewritten in place (same paths, same settings): the cells made on the
    # old data run again.
    svm_only = [a.replace("--methods=svm,simclr,pcl", "--methods=svm").replace("--splits=random,disjoint",
                                                                               "--splits=random")
                for a in table_args] + ["--finetune_epochs=7"]
    table.main(svm_only)
    assert "running it again" not in capsys.readouterr().out  # same data: kept
    cube_path = Path(toy[1].split("=", 1)[1])
    np.save(cube_path, np.load(cube_path) * 1.01)
    table.main(svm_only)
    assert ("svm_baseline_random_3pc.json: out of date (the scene's cube or labels are not the ones "
            "it was made on)") in capsys.readouterr().out


def test_pseudolabels_deterministic_cached_and_purity(tmp_path):
    rng = np.random.default_rng(0)
    spectra = np.concatenate([rng.normal(m, 0.1, size=(20, 40)) for m in (0.0, 1.0, 2.0)])
    a = superpixel_pseudolabels(spectra, 3, 30, seed=4)
    b = superpixel_pseudolabels(spectra, 3, 30, seed=4)
    assert np.array_equal(a, b) and len(set(a)) == 3
    cached, hit = cached_superpixel_pseudolabels(spectra, 3, 30, 4, tmp_path, "toy")
    again, hit2 = cached_superpixel_pseudolabels(spectra, 3, 30, 4, tmp_path, "toy")
    assert not hit and hit2 and np.array_equal(cached, a) and np.array_equal(again, a)
    superpixels = np.repeat(np.arange(60), 4).reshape(12, 20)
    pseudo = pixel_pseudolabels(superpixels, a)
    gt = np.repeat(np.repeat([1, 2, 3], 20), 4).reshape(12, 20)
    assert purity(pseudo, gt) == 1.0
    assert purity(np.zeros_like(gt), gt) == pytest.approx(1 / 3)


def test_pretrain_nsmm_writes_pseudolabel_map_and_purity(toy, capsys):
    pretrain_main.main(toy + TINY + ["--epochs=1", "--max_steps=1", "--negatives=pcl+nsmm",
                                      "--slic_pixels_per_segment=20", "--n_hard=4", "--n_easy=4"])
    out = capsys.readouterr().out
    assert "purity" in out
    assert Path("runs/custom/encoder/pseudolabels.png").exists()
    from utils.checkpoint import read_encoder_file
    _, meta = read_encoder_file("weights/custom/encoder.safetensors")
    assert 0 <= meta["pseudolabel_purity"] <= 1
    assert meta["pretrain_config"]["negatives"] == "pcl+nsmm"
    assert meta["log"][0]["fn_share_global"] is not None


def test_pretrain_low_memory_setting_reaches_the_encoder_and_trains_the_same(toy, capsys, monkeypatch):
    modes, policies = [], []
    original = PCLEncoder.set_low_memory
    monkeypatch.setattr(PCLEncoder, "set_low_memory", lambda self, flag=True: (modes.append(flag),
                                                                                 original(self, flag))[1])
    monkeypatch.setattr(pretrain_main, "set_allocator_policy",  # keep freed memory, or release it
                        lambda device, low_memory: policies.append((device.type, low_memory)))
    for flag in ("false", "true"):
        pretrain_main.main(toy + TINY + ["--epochs=1", "--max_steps=3", f"--low_memory={flag}",
                                         f"--out_name=lowmem_{flag}"])
    assert modes == [False, True] and policies == [("cpu", False), ("cpu", True)]
    plain, _ = load_encoder(Path("weights/custom/lowmem_false.safetensors"), build_encoder)
    lean, _ = load_encoder(Path("weights/custom/lowmem_true.safetensors"), build_encoder)
    for (name, a), b in zip(plain.state_dict().items(), lean.state_dict().values()):
        # three Adam steps from the same start (Adam's first step is lr * sign(gradient); later
        # ones see gradient sizes): recomputing in backward reruns the same kernels
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def count_host_reads(monkeypatch):
    """A list that grows by one at every read of a tensor's value by the host (item, float,
    bool, ...): on a GPU each makes the host wait for the queued work."""
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _f=original, _n=name: (reads.append(_n), _f(self, *a))[1])
    return reads


def test_pretraining_steps_read_nothing_back_from_the_device_between_reports(toy, capsys, monkeypatch):
    """The loop reads the loss every REPORT_EVERY steps (progress bar, the ranks' stop vote) and
    the epoch's sums once: 20 more steps may add only the reports' reads."""
    reads = count_host_reads(monkeypatch)
    counts = []
    for steps in (3, 23):  # one epoch of 32 steps, cut short
        reads.clear()
        pretrain_main.main(toy + TINY + ["--epochs=1", f"--max_steps={steps}", "--negatives=pcl+nsmm",
                                         "--n_hard=4", "--n_easy=4", f"--out_name=reads_{steps}"])
        counts.append(len(reads))
    assert counts[1] - counts[0] <= 20 // pretrain_main.REPORT_EVERY * 2, reads


def test_host_to_device_queues_copies_from_pinned_memory_on_cuda(monkeypatch):
    """A copy from pageable memory to a GPU first waits for the GPU's queued work; from pinned
    memory, non_blocking, it is queued like a kernel (torch.Tensor patched: no GPU needed)."""
    from utils.device import host_to_device
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: (calls.append("pin"), self)[1])
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: (calls.append((a, k)), self)[1])
    t, gpu, cpu = torch.arange(3), torch.device("cuda", 0), torch.device("cpu")
    assert host_to_device(t, gpu) is t and calls == ["pin", ((gpu,), {"non_blocking": True})]
    calls.clear()
    assert host_to_device(t, cpu) is t and calls == [((cpu,), {})]


@pytest.mark.parametrize("augment", [False, True])
def test_finetuning_steps_read_nothing_back_from_the_device(monkeypatch, augment):
    from data.patches import random_views
    cube, gt = np.random.default_rng(0).random((12, 12, 6), dtype=np.float32), np.arange(144) % 3 + 1
    cutter = PatchCutter(standardise(cube), 5, torch.device("cpu"))
    counts = []
    for n in (8, 24):  # 2 and 6 steps of 4
        torch.manual_seed(0)
        model = TwoHeadClassifier(PCLEncoder(6, 5, "small"), 3)
        reads = count_host_reads(monkeypatch)
        train_classifier(model, cutter, np.arange(n), gt[:n], epochs=1, batch_size=4,
                         augment=(lambda x, g: random_views(x, g)) if augment else None)
        counts.append(len(reads))
        monkeypatch.undo()
    assert counts[0] == counts[1], counts


def test_epoch_sums_give_the_python_float_means_and_skip_nan_diagnostics():
    """EpochSums keeps the sums on the device; its means equal summing Python floats bit for bit,
    a step whose diagnostic is nan (no labelled pair in its batch) does not count for it, and a
    diagnostic nan in every step is None (null in the log)."""
    steps = [(2.5, 0.3, float("nan")), (2.25, float("nan"), float("nan")), (2.0, 0.1, float("nan"))]
    sums = pretrain_main.EpochSums(torch.device("cpu"))
    for values in steps:
        sums.add({k: torch.tensor(v, dtype=torch.float32) for k, v in zip(pretrain_main.EpochSums.KEYS, values)})
    loss = sum(float(torch.tensor(v[0], dtype=torch.float32)) for v in steps) / 3
    share = (float(torch.tensor(0.3, dtype=torch.float32)) + float(torch.tensor(0.1, dtype=torch.float32))) / 2
    assert sums.means() == {"loss": loss, "fn_share_global": share, "fn_share_local": None}
