"""DDP pretraining (issue 5): K processes on one global batch take the step of one process.

Two gloo processes on the CPU (torch.multiprocessing.spawn) run pretrain_main.train_step on
their halves of a global batch; the mean of their losses and their DDP-averaged parameter
gradients must equal one process's loss and gradients on the whole batch. BatchNorm layers
are in eval mode there: SyncBatchNorm needs CUDA in torch 2.13 ("SyncBatchNorm expected
input tensor to be on GPU"), so on CPU each process normalises over its own slice and
train-mode steps differ by that alone (on CUDA pretrain_main.py converts to SyncBatchNorm).
"""
import json
import os
import socket
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pretrain_main
from data.patches import PatchCutter, apply_views, draw_view_params, random_views
from models.encoder import PCLEncoder
from utils import distributed
from utils.errors import UserError
from utils.make_synthetic_scene import make_scene

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"dim": 8, "depth": 1, "heads": 2, "ffn_ratio": 2, "stem_channels": 2, "resnet_widths": [4, 8],
              "resnet_blocks": [1, 1], "proj_hidden": 8, "proj_dim": 8, "band_proj": 0}
BANDS, PATCH, BATCH = 6, 5, 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_step(rank, world):
    """train_step on the fixed tiny problem; returns (this rank's loss, global loss, diagnostics, {name: grad})."""
    rng = np.random.default_rng(0)
    h, w = 12, 10
    cutter = PatchCutter(rng.standard_normal((h, w, BANDS)).astype(np.float32), PATCH)
    spectra_t = torch.from_numpy(rng.standard_normal((h * w, BANDS)).astype(np.float32))
    pseudo_t = torch.from_numpy(rng.integers(0, 3, h * w))
    labels_t = torch.from_numpy(rng.integers(0, 4, h * w))
    config = {k: getattr(pretrain_main, k) for k in pretrain_main.SETTINGS}
    config.update(negatives="pcl+nsmm", n_hard=3, n_easy=3)
    batch_index = torch.randperm(h * w, generator=torch.Generator().manual_seed(1))[:BATCH]
    torch.manual_seed(0)
    model = PCLEncoder(BANDS, PATCH, "small", **TINY_MODEL)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():  # running statistics of the whole scene (at their init of 0 and 1 features collapse)
        for m in norms:
            m.momentum = 1.0
        model(cutter(torch.arange(h * w)))
    for m in norms:
        m.eval()  # per-sample features then do not depend on how the batch is split
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(model)
    loss, diag = pretrain_main.train_step(net, cutter, batch_index, spectra_t, pseudo_t, labels_t, config,
                                          torch.Generator().manual_seed(7), torch.Generator().manual_seed(8),
                                          nullcontext, rank, world)
    loss.backward()
    global_loss = distributed.mean_over_ranks([loss.item()], world)[0]
    diag = {k: v.item() for k, v in diag.items()}  # 0-dim tensors, left on the device by train_step
    return loss.item(), global_loss, diag, {k: p.grad.clone() for k, p in model.named_parameters()}


def worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(one_step(rank, world), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_views_drawn_for_the_global_batch_and_sliced():
    x = torch.randn(8, 3, 5, 5)
    gen = torch.Generator().manual_seed(3)
    whole = torch.cat([random_views(x, gen), random_views(x, gen)])
    for rank in range(2):
        gen = torch.Generator().manual_seed(3)
        own = slice(4 * rank, 4 * rank + 4)
        u1, u2 = draw_view_params(8, gen)[own], draw_view_params(8, gen)[own]
        part = torch.cat([apply_views(x[own], u1), apply_views(x[own], u2)])
        assert torch.equal(part, torch.cat([whole[own], whole[8:][own]]))


def test_two_gloo_processes_equal_one_process(tmp_path):
    torch.set_num_threads(1)
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    local0, loss0, diag0, grads0 = torch.load(tmp_path / "rank0.pt")
    local1, loss1, diag1, grads1 = torch.load(tmp_path / "rank1.pt")
    _, loss, diag, grads = one_step(0, 1)
    assert loss0 == loss1 == pytest.approx(loss, abs=1e-5)
    # each rank's loss is the mean over its own anchors only (not the whole batch's loss
    # computed twice): the two differ, and their mean is the one-process loss
    assert abs(local0 - local1) > 1e-3
    assert (local0 + local1) / 2 == pytest.approx(loss, abs=1e-5)
    for key in diag:
        assert diag0[key] == diag1[key] == pytest.approx(diag[key], abs=1e-5)
    assert set(grads0) == set(grads)
    for name, g in grads.items():
        torch.testing.assert_close(grads0[name], g, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(grads1[name], grads0[name], rtol=0, atol=0)
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


def test_batch_size_must_divide_by_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="--batch_size=32 does not divide by the 3 processes"):
        pretrain_main.main(["--dataset=SalinasA", "--batch_size=32"])


def test_torchrun_two_processes_end_to_end(tmp_path):
    cube, gt, _ = make_scene(20, 20, 8, 3, seed=0)
    np.save(tmp_path / "cube.npy", cube)
    np.save(tmp_path / "gt.npy", gt)
    args = ["--dataset=custom", f"--cube={tmp_path / 'cube.npy'}", f"--gt={tmp_path / 'gt.npy'}", "--layout=HWB",
            # 400 pixels, batch 32: one whole epoch of 12 steps, so it is checkpointed; the ranks read the
            # loss and vote on stopping at steps 10 and 12 only, and average the epoch's loss at its end
            "--preset=small", "--patch_size=5", "--batch_size=32", "--epochs=1", "--threads=1",
            "--negatives=pcl+nsmm", "--pseudo_k=3", "--n_hard=4", "--n_easy=4", f"--cache_dir={tmp_path / 'cache'}",
            "--slic_pixels_per_segment=20"]  # about 20 superpixels (the default 200 gives 1: one pseudolabel)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(ROOT / "pretrain_main.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved weights/custom/encoder.safetensors") == 1  # rank 0 only
    assert proc.stdout.count("pretrain_main.py  commit") == 1
    assert (tmp_path / "weights" / "custom" / "encoder.safetensors").is_file()
    state = torch.load(tmp_path / "runs" / "custom" / "encoder" / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"])  # the plain module, not the DDP wrapper
    record = json.loads(state["log"])[0]
    assert record["epoch"] == 1 and "steps" not in record and 0 < record["loss"] < 100  # a whole epoch, its mean


def test_process_group_waits_longer_than_nccls_default(monkeypatch):
    """The other ranks wait in a barrier while rank 0 downloads and segments a scene: the group
    is joined with an hour's timeout (NCCL's default is 10 minutes), gloo on the CPU."""
    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.append((backend, kwargs)))
    assert distributed.setup(torch.device("cpu")) == (1, 2, torch.device("cpu"))
    assert joined == [("gloo", {"rank": 1, "world_size": 2, "timeout": distributed.GROUP_TIMEOUT})]
    assert distributed.GROUP_TIMEOUT.total_seconds() >= 3600


def stop_worker(rank, world, port, folder):
    """pretrain_main.main as one torchrun process; rank 1 gets SIGTERM during its 3rd step."""
    import signal
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    os.chdir(folder)
    torch.set_num_threads(1)
    steps = []
    real_step = pretrain_main.train_step

    def counted(*args, **kwargs):
        steps.append(1)
        if rank == 1 and len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # this rank alone asks to stop
        return real_step(*args, **kwargs)

    pretrain_main.train_step = counted
    outcome = "finished"
    try:
        pretrain_main.main(["--dataset=custom", "--cube=cube.npy", "--gt=gt.npy", "--layout=HWB", "--preset=small",
                            "--patch_size=5", "--batch_size=32", "--epochs=2", "--threads=1", "--cache_dir=cache"])
    except KeyboardInterrupt:
        outcome = "interrupted"
    Path(f"rank{rank}.json").write_text(json.dumps({"steps": len(steps), "outcome": outcome}))


def test_a_stop_asked_by_one_rank_stops_every_rank_at_the_next_report(tmp_path):
    """The ranks agree on stopping when they read the loss (every REPORT_EVERY steps): a SIGTERM
    to one process stops both at the same step, no rank left waiting in a collective."""
    cube, gt, _ = make_scene(20, 20, 8, 3, seed=0)  # 400 pixels, batch 32: 12 steps an epoch
    np.save(tmp_path / "cube.npy", cube)
    np.save(tmp_path / "gt.npy", gt)
    context = mp.start_processes(stop_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    for _ in range(120):  # a hang fails the test instead of the suite
        if context.join(timeout=1):
            break
    else:
        for p in context.processes:
            p.kill()
        pytest.fail("the two processes did not finish within 2 minutes")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] == {"steps": pretrain_main.REPORT_EVERY, "outcome": "interrupted"}
    assert not (tmp_path / "weights").exists()  # an interrupted run saves no weights
