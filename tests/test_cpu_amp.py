"""--cpu_amp: bf16 autocast on CPUs with bf16 arithmetic (pretrain_main, finetune, bench.run).

Where the CPU running the tests lacks bf16 arithmetic, `cpu_has_bf16` is patched to True: torch
then emulates bf16, slower but the same rounding, so every test here runs on any CPU.
"""
import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import finetune
import pretrain_main
from models.encoder import PCLEncoder
from utils import device as device_module
from utils.device import autocast_for
from utils.errors import UserError
from utils.make_synthetic_scene import write_scene

TINY = ["--preset=small", "--patch_size=7", "--batch_size=32", "--threads=2", "--cache_dir=cache"]


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HSI_DATA_DIR", str(tmp_path / "no_data_here"))
    cube, gt, names = write_scene(tmp_path / "toy", height=32, width=32, bands=12, n_classes=3, seed=1)
    return ["--dataset=custom", f"--cube={cube}", f"--gt={gt}", f"--class_names={names}"]


@pytest.fixture()
def autocast_spy(monkeypatch):
    """Records, at every PCLEncoder forward, whether CPU autocast was on and with which dtype."""
    calls = []
    original = PCLEncoder.forward

    def spy(self, x, pixel=None):
        calls.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), self.training))
        return original(self, x, pixel)

    monkeypatch.setattr(PCLEncoder, "forward", spy)
    return calls


def epoch_records(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith('{"epoch"')]


def test_autocast_for_picks_the_context_and_refuses_emulated_bf16(monkeypatch):
    cpu = torch.device("cpu")
    assert autocast_for(cpu, True, False) is nullcontext  # amp alone is for CUDA
    assert autocast_for(torch.device("cuda"), False, True) is nullcontext  # cpu_amp does not touch CUDA
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    with autocast_for(cpu, False, True)():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match=r"--cpu_amp=true: this CPU has no bf16 arithmetic .*--cpu_amp=false"):
        autocast_for(cpu, False, True)


@pytest.mark.parametrize("script", ["pretrain_main", "finetune", "bench.run"])
def test_cpu_amp_without_bf16_is_refused_before_any_work(toy, monkeypatch, script):
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)
    if script == "pretrain_main":
        run = lambda: pretrain_main.main(toy + TINY + ["--cpu_amp=true"])  # noqa: E731
    elif script == "finetune":
        run = lambda: finetune.main(toy + ["--method=svm", "--cpu_amp=true"])  # noqa: E731
    else:
        import bench.run
        run = lambda: bench.run.main(["--dataset=tiny", "--cpu_amp=true", "--out=b.json"], log=lambda *a: None)  # noqa: E731
    with pytest.raises(UserError, match="no bf16 arithmetic"):
        run()
    assert sorted(p.name for p in Path(".").iterdir()) == ["toy"]  # no cache, run folder, weights or results


def test_pretraining_with_cpu_amp_runs_the_encoder_in_bf16_close_to_float32(toy, monkeypatch, capsys, autocast_spy):
    """Same seed, one step: the first loss (same weights, same views) differs only by bf16
    rounding, so it is close to float32's but not equal (which shows bf16 ran); the loss is float32."""
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    losses = {}
    for flag in ("false", "true"):
        autocast_spy.clear()
        pretrain_main.main(toy + TINY + ["--epochs=1", "--max_steps=1", f"--cpu_amp={flag}", f"--out_name=amp_{flag}"])
        assert autocast_spy and all(on == (flag == "true") for on, _, _ in autocast_spy)
        if flag == "true":
            assert all(dtype == torch.bfloat16 for _, dtype, _ in autocast_spy)
        losses[flag] = epoch_records(capsys.readouterr().out)[-1]["loss"]
    assert losses["true"] == pytest.approx(losses["false"], rel=2e-2)
    assert losses["true"] != losses["false"]


def test_finetuning_with_cpu_amp_trains_in_bf16_and_predicts_in_float32(toy, monkeypatch, capsys, autocast_spy):
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    pretrain_main.main(toy + TINY + ["--epochs=1", "--max_steps=1"])
    capsys.readouterr()
    autocast_spy.clear()
    finetune.main(toy + ["--protocol=finetune", "--finetune_epochs=2", "--train_per_class=5", "--cpu_amp=true",
                         "--save_map=false"])
    training = [on for on, _, is_training in autocast_spy if is_training]
    predicting = [on for on, _, is_training in autocast_spy if not is_training]
    assert training and all(training)            # every training forward under bf16 autocast
    assert predicting and not any(predicting)    # features and predictions in float32
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("OA ")


def test_pretraining_with_cpu_amp_is_reproducible(toy, monkeypatch, capsys):
    """Same seed, same threads, bf16 autocast: the same weights, bit for bit, run after run."""
    from utils.checkpoint import load_encoder
    from models.encoder import build_encoder

    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    for name in ("a", "b"):
        pretrain_main.main(toy + TINY + ["--epochs=1", "--max_steps=2", "--cpu_amp=true", f"--out_name={name}"])
    first, _ = load_encoder(Path("weights/custom/a.safetensors"), build_encoder)
    second, _ = load_encoder(Path("weights/custom/b.safetensors"), build_encoder)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
