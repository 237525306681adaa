"""Where an encoder training step's time goes: forward + backward of each part, fast and
reference forms alternated (issue 5; docs/BENCHMARKS.md).

    python -m bench.parts --preset=paper --batch_size=512 --threads=2 [--repeats=3] [--cpu_amp=true]

batch_size is patches per pass (512 = one pretraining step of 256 anchors, two views; 64 =
one fine-tuning step). Each repeat times every part in the fast form, then in the reference
form (`set_fast(False)`, the same weights), so slow spells of a shared machine hit both.
--cpu_amp=true runs the fast form's forward under bf16 autocast (as the scripts' --cpu_amp; the
reference form stays float32), so its ratio is the bf16 speed-up measured side by side.
Both forms run with the scripts' CPU allocator setting (utils.device.set_allocator_policy).
Parts, each forward then backward of the sum of its output:
- pixel stage: spectral stem + the stacks' 1x1 reduce (GlobalBranch.pixel_stage);
- stacks + fuse: the stacks' 3x3 / 5x5 bodies, fuse and position embedding (GlobalBranch.tokens);
- transformer: the blocks, final LayerNorm and token mean;
- local branch: ResNet + projection MLP;
- whole encoder: PCLEncoder on the patches (all four outputs).
Prints min and median per part and form, the forward FLOPs per patch of each part and the
median's GFLOP/s (3 x forward FLOPs, as bench.run); writes the same as JSON to --out if set.
"""
import functools
import os
import sys
import time
from contextlib import nullcontext

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the scripts
import torch  # noqa: E402

from bench.run import counted_flops  # noqa: E402
from models.encoder import PCLEncoder, PRESETS  # noqa: E402
from utils.config import resolve_config  # noqa: E402
from utils.device import autocast_for, check_cpu_amp, set_allocator_policy  # noqa: E402
from utils.errors import UserError, run_main  # noqa: E402
from utils.fileio import write_json  # noqa: E402

preset = "paper"
bands = 204           # SalinasA's
patch_size = 15
batch_size = 512      # patches per pass
repeats = 3
threads = 2           # torch CPU threads; 0 = torch's default
seed = 0
cpu_amp = False       # the fast form under bf16 autocast (CPUs with bf16 arithmetic only)
out = ""              # optional JSON path

PART_NAMES = ("pixel stage", "stacks + fuse", "transformer", "local branch", "whole encoder")


def part_functions(encoder, x, requires_grad=True, autocast=nullcontext):
    """x: (N, B, P, P) -> {part name: no-argument function returning a float32 tensor whose sum
    is back-propagated}. Later parts start from detached outputs of earlier ones (computed here,
    untimed; requires_grad as given), so each part runs alone. The branches read the
    band-projected patches (the small preset's band_proj, untimed; none in the paper's).
    autocast: no-argument callable giving the context every part's forward runs in."""
    parts = _part_forwards(encoder, x, requires_grad, autocast)
    return {name: functools.partial(_run_in, autocast, fn) for name, fn in parts.items()}


def _run_in(autocast, fn):
    """fn() under the autocast context, as float32 (a bf16 output's sum would round)."""
    with autocast():
        return fn().float()


def _part_forwards(encoder, x, requires_grad, autocast):
    """part_functions' forwards, un-wrapped; the parts' inputs are made under autocast, so a
    bf16 run hands each part what the whole encoder's bf16 forward would (e.g. bf16 tokens)."""
    g = encoder.global_branch
    with torch.no_grad(), autocast():
        xb = encoder.band_proj(x)                                  # (N, band_proj or B, P, P)
        pixel = g.pixel_stage(xb)                                   # (N, S*dim/4, P, P)
        tokens = g.tokens(pixel)                                   # (N, T, dim)
    pixel.requires_grad_(requires_grad)
    tokens = tokens.detach().requires_grad_(requires_grad)
    return {
        "pixel stage": lambda: g.pixel_stage(xb),
        "stacks + fuse": lambda: g.tokens(pixel),
        "transformer": lambda: g.norm(g.forward_blocks(tokens)).mean(dim=1),
        "local branch": lambda: encoder.local_proj(encoder.local_branch(xb)),
        "whole encoder": lambda: sum(v.sum() for v in encoder(x).values()),
    }


def forward_flops(encoder, x):
    """Forward FLOPs per patch of each part, counted as bench.run counts the model's."""
    return {name: counted_flops(encoder, lambda _: fn()) for name, fn in part_functions(encoder, x[:1], False).items()}


def main(argv, log=print):
    config = resolve_config({k: globals()[k] for k in ("preset", "bands", "patch_size", "batch_size",
                                                      "repeats", "threads", "seed", "cpu_amp", "out")}, argv)
    if config["preset"] not in PRESETS:
        raise UserError(f"--preset={config['preset']}: expected one of {', '.join(PRESETS)}")
    if config["batch_size"] < 2 or config["repeats"] < 1 or config["bands"] < 1:
        raise UserError("--batch_size must be >= 2, --repeats >= 1, --bands >= 1")
    if config["threads"] < 0:
        raise UserError(f"--threads={config['threads']}: expected >= 0 (0 = torch's default)")
    check_cpu_amp(torch.device("cpu"), config["cpu_amp"])
    if config["threads"] > 0:
        torch.set_num_threads(config["threads"])
    set_allocator_policy(torch.device("cpu"), low_memory=False)
    torch.manual_seed(config["seed"])
    encoder = PCLEncoder(config["bands"], config["patch_size"], config["preset"]).train()
    x = torch.randn(config["batch_size"], config["bands"], config["patch_size"], config["patch_size"])
    flops = forward_flops(encoder, x)
    times = {(form, name): [] for form in ("fast", "reference") for name in PART_NAMES}
    fast_autocast = autocast_for(torch.device("cpu"), False, config["cpu_amp"])
    for repeat in range(config["repeats"] + 1):                    # the first is a warm-up
        for form in ("fast", "reference"):
            encoder.set_fast(form == "fast")
            autocast = fast_autocast if form == "fast" else nullcontext
            for name, fn in part_functions(encoder, x, autocast=autocast).items():
                t0 = time.perf_counter()
                fn().sum().backward()
                if repeat:
                    times[form, name].append(time.perf_counter() - t0)
        encoder.zero_grad(set_to_none=True)
    log(f"bench.parts  preset {config['preset']}  {config['batch_size']} patches of {config['bands']} x "
        f"{config['patch_size']} x {config['patch_size']}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
        f"repeats {config['repeats']}" + ("  fast form under bf16 autocast" if config["cpu_amp"] else ""))
    log(f"  {'part':14s} {'GFLOP/patch':>11s} | {'fast min / median':>18s} {'GFLOP/s':>7s} | "
        f"{'reference min / median':>22s} {'GFLOP/s':>7s} | ref/fast")
    result = {"config": config, "torch": torch.__version__, "parts": {}}
    for name in PART_NAMES:
        row = {"forward_flops_per_patch": flops[name]}
        for form in ("fast", "reference"):
            t = sorted(times[form, name])
            row[form] = {"min_s": t[0], "median_s": t[len(t) // 2],
                         "gflop_per_s": 3 * flops[name] * config["batch_size"] / t[len(t) // 2] / 1e9}
        result["parts"][name] = row
        f, r = row["fast"], row["reference"]
        log(f"  {name:14s} {flops[name] / 1e9:11.3f} | {f['min_s']:7.2f} / {f['median_s']:6.2f} s "
            f"{f['gflop_per_s']:7.0f} | {r['min_s']:11.2f} / {r['median_s']:6.2f} s {r['gflop_per_s']:7.0f} | "
            f"{r['median_s'] / f['median_s']:5.2f}x")
    if config["out"]:
        write_json(config["out"], result)
        log(config["out"])
    return result


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
