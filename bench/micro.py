"""Micro-benchmarks behind docs/BENCHMARKS.md's notes on the spectral stem (issue 5).

    python -m bench.micro [--threads=2] [--keep_freed_memory=false]

Prints, min and median over 5 timed repeats after one warm-up (31 for the channel attention
and max-pool cases, 15 for the attention ones; medians only where a line shows one):
- one 376 MB per-channel pass (the stem's BatchNorm multiply-add over 512 paper-preset
  patches' (M, 8) rows): 8-wide rows, the 128-wide view, and into an existing buffer;
- a fresh 376 MB tensor filled, against refilling one that exists (page-fault cost);
- the global branch's per-pixel stage (spectral stem + the stacks' 1x1 reduce) on 512
  patches, forward and backward, as the encoder runs it;
- one 512-channel 3x3 conv of the ResNet's last stage on 512 and on 64 2 x 2 maps, forward
  and backward, as SmallMapConv2d's matmul and as Conv2d;
- BatchNorm + ReLU forward and backward on one stack's half of the pixel stage's
  channels-last output: the strided channel slice, against a channels-last copy;
- attention over 512 patches' heads as the encoder lays them out (spatial: q, k, v of
  (512, 4, 25, 32); channel: (512, 4, 32, 25)), F.scaled_dot_product_attention against
  the written-out softmax(q k^T s) v, forward + backward and forward alone (no autograd);
- the channel attention's heads of 64 patches: F.normalize on q and k, against the inverse
  norms scaling the scores (cosine_attention), float32 and bf16;
- a stack's max-pool on 64 patches' maps, NCHW against channels-last, float32 and bf16;
- one Adam step over the paper encoder's parameters, torch's default and fused;
- a bf16 fine-tuning step (64 paper-preset patches, as --cpu_amp runs it) with the spectral
  stem's channels-last copy returning an NCHW gradient, against autograd's copy, alternated;
- a 4096 x 4096 x 4096 matmul in float32 and in bf16: the GFLOP/s this CPU sustains in the best
  case (the roofs the model's achieved GFLOP/s in bench.run is compared with; bf16 is emulated,
  and slow, on CPUs without bf16 arithmetic).
"""
import os
import sys
import time
import types

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the scripts
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models.encoder as encoder_module  # noqa: E402
from models.classifier import TwoHeadClassifier  # noqa: E402
from models.encoder import PCLEncoder, SmallMapConv2d, cosine_attention, explicit_attention  # noqa: E402
from utils.config import resolve_config  # noqa: E402
from utils.device import cpu_has_bf16, keep_freed_memory  # noqa: E402
from utils.errors import run_main  # noqa: E402

threads = 2
keep_freed = False  # true: utils.device.keep_freed_memory() first, as the scripts on CPU


def timed(fn, repeats=5):
    """(min, median) seconds of fn() over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), sorted(times)[len(times) // 2]


def bf16_stem_backward_layouts(repeats=5):
    """A bf16 fine-tuning step (64 paper-preset patches, TwoHeadClassifier, fused Adam) with the
    spectral stem's channels-last copy handing back an NCHW gradient (the encoder's
    _ChannelsLastCopy) against autograd's copy (mixed layouts in ReLU / BatchNorm backward),
    alternated `repeats` times; median seconds per step. Skipped on CPUs without bf16."""
    if not cpu_has_bf16():
        print("  bf16 fine-tuning step: skipped, this CPU has no bf16 arithmetic")
        return
    torch.manual_seed(0)
    model = TwoHeadClassifier(PCLEncoder(204, 15, "paper"), 6).train()
    adam = torch.optim.Adam(model.parameters(), lr=1e-5, fused=True)
    x, y = torch.randn(64, 204, 15, 15), torch.randint(0, 6, (64,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g, l = model(x)
        loss = F.cross_entropy(g.float(), y) + F.cross_entropy(l.float(), y)
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()

    forms = {"NCHW gradient (the encoder's)": encoder_module._ChannelsLastCopy,
             "autograd's copy (mixed layouts)": types.SimpleNamespace(
                 apply=lambda t: t.contiguous(memory_format=torch.channels_last))}
    times = {name: [] for name in forms}
    try:
        for _ in range(repeats):
            for name, copy_form in forms.items():
                encoder_module._ChannelsLastCopy = copy_form
                times[name].append(timed(step, repeats=3)[1])
    finally:
        encoder_module._ChannelsLastCopy = forms["NCHW gradient (the encoder's)"]
    for name, t in times.items():
        print(f"  bf16 fine-tuning step (64 patches), stem copy: {name:32s} median {sorted(t)[len(t) // 2]:.3f} s")


def channel_attention_norms(repeats=31):
    """The channel attention's heads of 64 patches, forward + backward, laid out as the module
    has them (q, k, v of (64, 4, 32, 25) slices of one (64, 3, 4, 32, 25) conv-qkv output, in
    float32, or in bf16 as under autocast): F.normalize on q and k then softmax(t q k^T) v,
    against the inverse norms scaling the (32, 32) scores (cosine_attention)."""
    gen = torch.Generator().manual_seed(0)
    temperature = torch.rand(4, 1, 1, generator=gen) + 0.5
    grad = torch.randn(64, 4, 32, 25, generator=gen)
    forms = (("normalise q, k", lambda q, k, v: explicit_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1),
                                                                    v, temperature)),
             ("scale scores", lambda q, k, v: cosine_attention(q, k, v, temperature)))
    for dtype in (torch.float32, torch.bfloat16):
        qkv = torch.randn(64, 3, 4, 32, 25, generator=gen).to(dtype).requires_grad_()
        for name, form in forms:
            def run():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    out = form(*qkv.unbind(1))
                out.backward(grad.to(out.dtype))
            best, median = timed(run, repeats=repeats)
            print(f"  channel attention (64, 4, 32, 25) {str(dtype)[6:]:8s}, {name:14s} fwd+bwd "
                  f"min {best * 1e3:5.1f} ms  median {median * 1e3:5.1f} ms")


def max_pool_layouts(repeats=31):
    """A stack's MaxPool2d(3, stride 2, pad 1) on 64 patches' (64, 64, 15, 15) maps, forward and
    backward, NCHW against channels-last, float32 and bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        for layout in (torch.contiguous_format, torch.channels_last):
            maps = torch.randn(64, 64, 15, 15, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
            grad = torch.randn_like(F.max_pool2d(maps, 3, 2, 1))  # dense, in the output's layout (as from a conv)
            forward = timed(lambda: F.max_pool2d(maps, 3, 2, 1), repeats=repeats)
            both = timed(lambda: F.max_pool2d(maps, 3, 2, 1).backward(grad), repeats=repeats)
            name = "channels-last" if layout == torch.channels_last else "NCHW"
            print(f"  max-pool (64, 64, 15, 15) {str(dtype)[6:]:8s} {name:13s} forward median {forward[1] * 1e3:5.2f} ms"
                  f"  fwd+bwd median {both[1] * 1e3:5.2f} ms")


def main(argv):
    config = resolve_config({"threads": threads, "keep_freed_memory": keep_freed}, argv)
    torch.set_num_threads(config["threads"])
    if config["keep_freed_memory"]:
        keep_freed_memory()
    print(f"bench.micro  torch {torch.__version__}  threads {config['threads']}  "
          f"keep_freed_memory {config['keep_freed_memory']}")
    rows = torch.randn(512 * 102 * 225, 8)                       # (M, C): 376 MB
    scale, shift = torch.rand(8), torch.rand(8)
    wide = rows.view(-1, 128)                                    # (M/16, 128), the same memory
    wide_scale, wide_shift, out = scale.repeat(16), shift.repeat(16), torch.empty_like(wide)
    cases = {
        "addcmul, (M, 8) rows, new output": lambda: torch.addcmul(shift, rows, scale),
        "addcmul, (M/16, 128) view, new output": lambda: torch.addcmul(wide_shift, wide, wide_scale),
        "addcmul, (M/16, 128) view, into a buffer": lambda: torch.addcmul(wide_shift, wide, wide_scale, out=out),
        "fresh 376 MB tensor, filled": lambda: torch.empty_like(rows).fill_(1),
        "existing 376 MB tensor, filled": lambda: out.fill_(1),
    }
    for name, fn in cases.items():
        best, median = timed(fn)
        print(f"  {name:45s} min {best * 1e3:6.0f} ms  median {median * 1e3:6.0f} ms")
    del rows, wide, out
    torch.manual_seed(0)
    branch = PCLEncoder(204, 15, "paper").global_branch
    x = torch.randn(512, 204, 15, 15)
    state = {}
    forward = timed(lambda: state.update(r=branch.pixel_stage(x)))
    backward = timed(lambda: (branch.pixel_stage(x).sum().backward()))
    print(f"  pixel stage forward (512 patches)             min {forward[0]:.2f} s  median {forward[1]:.2f} s")
    print(f"  pixel stage forward + backward                min {backward[0]:.2f} s  median {backward[1]:.2f} s")
    del x
    conv = SmallMapConv2d(512, 512, 3, padding=1, bias=False)
    for n in (512, 64):  # a pretraining step's patches, a fine-tuning step's
        maps = torch.randn(n, 512, 2, 2).contiguous(memory_format=torch.channels_last).requires_grad_()
        for fast in (True, False):
            conv.fast = fast
            best, median = timed(lambda: conv(maps).sum().backward())
            form = "matmul" if fast else "Conv2d"
            print(f"  3x3 conv 512->512 on {n:3d} 2x2 maps, {form:6s} fwd+bwd "
                  f"min {best * 1e3:6.0f} ms  median {median * 1e3:6.0f} ms")
    bn = torch.nn.BatchNorm2d(32)
    halves = torch.randn(512, 64, 15, 15).contiguous(memory_format=torch.channels_last)
    for name, make in (("strided view", lambda: halves[:, :32]),
                       ("channels-last", lambda: halves[:, :32].contiguous(memory_format=torch.channels_last))):
        best, median = timed(lambda: bn(make().requires_grad_()).relu().sum().backward())
        print(f"  BatchNorm + ReLU fwd+bwd, half of (512, 64, 15, 15) channels-last, {name:13s} "
              f"min {best * 1e3:6.0f} ms  median {median * 1e3:6.0f} ms")
    del halves
    fused_attention = torch.nn.functional.scaled_dot_product_attention
    for kind, qkv_view in (("spatial", lambda qkv: qkv.transpose(-2, -1)), ("channel", lambda qkv: qkv)):
        qkv = torch.randn(512, 3, 4, 32, 25, requires_grad=True)  # (N, 3, heads, d, T), as ConvQKV
        q, k, v = qkv_view(qkv).unbind(1)
        grad = torch.randn(q.shape)  # a dense gradient, as from the projection after it
        for name, fn in (("fused", fused_attention), ("written-out", explicit_attention)):
            train = timed(lambda: fn(q, k, v, scale=0.2).backward(grad), repeats=15)
            with torch.no_grad():
                infer = timed(lambda: fn(q, k, v, scale=0.2), repeats=15)
            print(f"  {kind} attention {tuple(q.shape)}, {name:11s} fwd+bwd median {train[1] * 1e3:4.0f} ms"
                  f"  forward alone median {infer[1] * 1e3:4.0f} ms")
        del qkv, q, k, v, grad
    channel_attention_norms()
    max_pool_layouts()
    encoder = PCLEncoder(204, 15, "paper")
    for p in encoder.parameters():
        p.grad = torch.randn_like(p)
    for fused in (False, True):
        adam = torch.optim.Adam(encoder.parameters(), lr=1e-3, weight_decay=1e-4, fused=fused)
        best, median = timed(adam.step)
        print(f"  Adam step, 13.5M parameters, fused={fused!s:5s}     "
              f"min {best * 1e3:6.0f} ms  median {median * 1e3:6.0f} ms")
    del encoder, adam
    bf16_stem_backward_layouts()
    for dtype in (torch.float32, torch.bfloat16):  # bf16: the roof --cpu_amp runs under
        a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
        best, median = timed(lambda: a @ b)
        print(f"  matmul 4096^3 {str(dtype)[6:]:8s}                      min {best * 1e3:6.0f} ms  "
              f"median {median * 1e3:6.0f} ms  ({2 * 4096 ** 3 / best / 1e9:.0f} GFLOP/s at the min)")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
