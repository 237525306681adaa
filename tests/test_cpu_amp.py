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


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_for_picks_the_context_and_refuses_emulated_bf16(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(device_module, "cuda_has_bf16", lambda device: True)  # no GPU to ask
    assert autocast_for(cpu, True, False) is nullcontext  # amp alone is for CUDA
    assert autocast_for(cuda, False, True) is nullcontext  # cpu_amp does not touch CUDA
    on_cuda = autocast_for(cuda, True, False)()  # built, not entered: no GPU needed
    assert on_cuda.device == "cuda" and on_cuda.fast_dtype == torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    with autocast_for(cpu, False, True)():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match=r"--cpu_amp=true: this CPU has no bf16 arithmetic .*--cpu_amp=false"):
        autocast_for(cpu, False, True)
    assert autocast_for(cpu, False, False) is nullcontext  # nothing asked, nothing checked


@pytest.mark.filterwarnings("ignore:CUDA is not available")
@pytest.mark.parametrize("capability", [(7, 5), (8, 0)])
def test_amp_on_a_gpu_without_bf16_runs_float32_and_says_so(monkeypatch, capability):
    """A T4 or V100 (compute capability < 8.0) has no bf16 arithmetic and cuDNN no bf16 convs
    for it: --amp=true there trains in float32 with a one-line note, instead of failing or
    crawling; 8.0 and later run bf16. No GPU is needed: the capability query is patched."""
    from utils.device import amp_note, training_precision
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    cuda, old = torch.device("cuda", 1), capability < (8, 0)
    assert training_precision(cuda, True, False) == ("float32" if old else "bf16")
    assert training_precision(cuda, False, True) == "float32"
    assert (autocast_for(cuda, True, False) is nullcontext) == old
    note = amp_note(cuda, True)
    assert (note is not None) == old and amp_note(cuda, False) is None
    if old:
        assert note.startswith("note: --amp=true: Tesla T4 (compute capability 7.5)") and "float32" in note
    assert training_precision(torch.device("cpu"), True, False) == "float32"  # amp alone is for CUDA


def test_scripts_record_the_precision_that_ran(toy, monkeypatch):
    """The weights' metadata and finetune.py's JSON say what training ran in, not the flags:
    the default amp=true on the CPU is float32; --cpu_amp=true is bf16; a linear probe trains
    nothing in either (float32)."""
    from utils.checkpoint import read_encoder_metadata
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    for flag, precision in (("false", "float32"), ("true", "bf16")):
        pretrain_main.main(toy + TINY + ["--epochs=1", "--max_steps=1", "--amp=true", f"--cpu_amp={flag}",
                                         f"--out_name=p_{flag}"])
        assert read_encoder_metadata(Path(f"weights/custom/p_{flag}.safetensors"))["precision"] == precision
    for protocol, flag, precision in (("finetune", "true", "bf16"), ("finetune", "false", "float32"),
                                      ("linear", "true", "float32")):
        out = finetune.main(toy + [f"--protocol={protocol}", "--finetune_epochs=1", "--train_per_class=5",
                                   f"--cpu_amp={flag}", "--amp=true", "--save_map=false", "--weights=weights/custom/p_false.safetensors",
                                   f"--name={protocol}_{flag}"])
        assert json.loads(Path(out).read_text())["precision"] == precision
    import bench.run
    path = bench.run.main(["--dataset=tiny", "--preset=small", "--patch_size=5", "--batch_size=8",
                           "--finetune_batch_size=6", "--steps=1", "--warmup=0", "--parts=pretrain,finetune",
                           "--threads=1", "--cpu_amp=true", "--out=b.json"], log=lambda *a: None)
    result = json.loads(Path(path).read_text())
    assert result["pretrain"]["precision"] == result["finetune"]["precision"] == "bf16"


@pytest.mark.parametrize("script", ["pretrain_main", "finetune", "bench.run", "utils.table"])
def test_cpu_amp_without_bf16_is_refused_before_any_work(toy, monkeypatch, script):
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)
    if script == "pretrain_main":
        run = lambda: pretrain_main.main(toy + TINY + ["--cpu_amp=true"])  # noqa: E731
    elif script == "finetune":
        run = lambda: finetune.main(toy + ["--method=svm", "--cpu_amp=true"])  # noqa: E731
    elif script == "bench.run":
        import bench.run
        run = lambda: bench.run.main(["--dataset=tiny", "--cpu_amp=true", "--out=b.json"], log=lambda *a: None)  # noqa: E731
    else:  # before pretraining any encoder of the table, not at its first fine-tuned cell
        import utils.table
        run = lambda: utils.table.main(toy[:1] + ["--methods=pcl", "--budgets=5", "--splits=random", "--seeds=0",  # noqa: E731
                                                  "--protocol=finetune",
                                                  "--finetune_args=--cpu_amp=true " + " ".join(toy[1:])])
    with pytest.raises(UserError, match="no bf16 arithmetic"):
        run()
    assert sorted(p.name for p in Path(".").iterdir()) == ["toy"]  # no cache, run folder, weights or results


def test_pretraining_with_cpu_amp_runs_the_encoder_in_bf16_close_to_float32(toy, monkeypatch, capsys, autocast_spy):
    """Same seed, one step: the first loss (same weights, same views) differs only by bf16
    rounding, so it is close to float32's but not equal (which shows bf16 ran); the loss is float32."""
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    loss_inputs = []
    original_loss = pretrain_main.weighted_nt_xent

    def loss_spy(z1, z2, *args):
        loss_inputs.append((z1.dtype, z2.dtype, torch.is_autocast_enabled("cpu")))
        return original_loss(z1, z2, *args)

    monkeypatch.setattr(pretrain_main, "weighted_nt_xent", loss_spy)
    losses = {}
    for flag in ("false", "true"):
        autocast_spy.clear()
        pretrain_main.main(toy + TINY + ["--epochs=1", "--max_steps=1", f"--cpu_amp={flag}", f"--out_name=amp_{flag}"])
        assert autocast_spy and all(on == (flag == "true") for on, _, _ in autocast_spy)
        if flag == "true":
            assert all(dtype == torch.bfloat16 for _, dtype, _ in autocast_spy)
        losses[flag] = epoch_records(capsys.readouterr().out)[-1]["loss"]
    assert loss_inputs and all(inputs == (torch.float32, torch.float32, False) for inputs in loss_inputs)
    assert losses["true"] == pytest.approx(losses["false"], rel=2e-2)
    assert losses["true"] != losses["false"]


def test_finetuning_with_cpu_amp_trains_in_bf16_and_predicts_in_float32(toy, monkeypatch, capsys, autocast_spy):
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    pretrain_main.main(toy + TINY + ["--epochs=1", "--max_steps=1"])
    capsys.readouterr()
    autocast_spy.clear()
    loss_inputs = []
    original_loss = torch.nn.functional.cross_entropy

    def loss_spy(logits, *args, **kwargs):
        loss_inputs.append((logits.dtype, torch.is_autocast_enabled("cpu")))
        return original_loss(logits, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", loss_spy)
    finetune.main(toy + ["--protocol=finetune", "--finetune_epochs=2", "--train_per_class=5", "--cpu_amp=true",
                         "--save_map=false"])
    assert all(dtype == torch.bfloat16 for _, dtype, is_training in autocast_spy if is_training)
    assert loss_inputs and all(inputs == (torch.float32, False) for inputs in loss_inputs)
    training = [on for on, _, is_training in autocast_spy if is_training]
    predicting = [on for on, _, is_training in autocast_spy if not is_training]
    assert training and all(training)            # every training forward under bf16 autocast
    assert predicting and not any(predicting)    # features and predictions in float32
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("OA ")


def test_pretraining_with_cpu_amp_is_reproducible_and_not_float32(toy, monkeypatch):
    """Same seed, same threads, bf16 autocast: the same weights, bit for bit, run after run,
    and not those of the float32 run (so bf16 did run)."""
    from utils.checkpoint import load_encoder
    from models.encoder import build_encoder

    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    weights = {}
    for name, flag in (("a", "true"), ("b", "true"), ("f32", "false")):
        pretrain_main.main(toy + TINY + ["--epochs=1", "--max_steps=2", f"--cpu_amp={flag}", f"--out_name={name}"])
        weights[name] = load_encoder(Path(f"weights/custom/{name}.safetensors"), build_encoder)[0].state_dict()
    assert weights["a"].keys() == weights["b"].keys() == weights["f32"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not all(torch.equal(weights["a"][k], weights["f32"][k]) for k in weights["a"])


def test_low_memory_with_cpu_amp_trains(toy, monkeypatch, capsys, autocast_spy):
    """Both options: the transformer blocks are recomputed in backward under the same autocast."""
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    pretrain_main.main(toy + TINY + ["--epochs=1", "--max_steps=2", "--cpu_amp=true", "--low_memory=true"])
    loss = epoch_records(capsys.readouterr().out)[-1]["loss"]
    assert loss == loss and abs(loss) < float("inf")
    assert autocast_spy and all(on for on, _, _ in autocast_spy)


def test_table_keeps_bf16_and_float32_work_apart():
    """utils.table reuses an encoder or a result only if it was made in the same precision; a file
    from before the setting existed counts as its default (float32)."""
    from utils.table import FINETUNE_FREE, PRETRAIN_FREE, changed_settings

    defaults = {"cpu_amp": False, "lr": 1e-3}
    for free in (PRETRAIN_FREE, FINETUNE_FREE):
        assert changed_settings({"lr": 1e-3}, {"cpu_amp": False, "lr": 1e-3}, free, defaults) == []
        assert changed_settings({"lr": 1e-3, "cpu_amp": True}, {"cpu_amp": False, "lr": 1e-3}, free, defaults) == \
            ["--cpu_amp was True, now False"]
        assert changed_settings({"lr": 1e-3}, {"cpu_amp": True, "lr": 1e-3}, free, defaults) == \
            ["--cpu_amp was False, now True"]
        assert changed_settings(None, {"cpu_amp": False, "lr": 1e-3}, free, defaults)  # no config: never reused
        # where the file records the precision that ran, it decides, not the flags (amp does
        # nothing on a CPU: a float32 run with amp=true is this table's float32 run)
        stored, expected = {"lr": 1e-3, "amp": True}, {"amp": False, "cpu_amp": False, "lr": 1e-3}
        assert changed_settings(stored, expected, free, defaults, ("float32", "float32")) == []
        assert changed_settings(stored, expected, free, defaults, ("bf16", "float32")) == \
            ["it was trained in bf16, this run would train in float32"]
        assert changed_settings(stored, expected, free, defaults, (None, "float32")) == ["--amp was True, now False"]


def test_table_reuses_an_encoder_only_if_it_ran_in_the_same_precision(toy, monkeypatch):
    """utils.table with an encoder file already there: refused when the file records another
    precision than the table's run would train in, reused when they agree."""
    from utils import table
    from models.encoder import build_encoder
    from utils.checkpoint import load_encoder, read_encoder_metadata, save_encoder
    cfg = dict(table.DEFAULTS, dataset="custom", epochs=1, preset="small", batch_size=32, threads=2,
               pretrain_args="--max_steps=1 --patch_size=7 --cache_dir=cache " + " ".join(toy[1:]))
    path = table.pretrain_if_missing(cfg, "pcl")
    metadata = read_encoder_metadata(path)
    assert metadata["precision"] == "float32"
    assert table.pretrain_if_missing(cfg, "pcl") == path  # reused
    encoder, _ = load_encoder(path, build_encoder)
    save_encoder(path, encoder, {**metadata, "precision": "bf16"})
    with pytest.raises(UserError, match="trained in bf16, this run would train in float32"):
        table.pretrain_if_missing(cfg, "pcl")


def test_finetune_says_when_cpu_amp_has_nothing_to_train(toy, monkeypatch, capsys):
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    finetune.main(toy + ["--method=svm", "--train_per_class=5", "--cpu_amp=true", "--save_map=false"])
    assert "note: --cpu_amp applies to training the encoder" in capsys.readouterr().out
