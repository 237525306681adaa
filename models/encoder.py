"""PCL encoder: a transformer (global) branch and a ResNet (local) branch over one patch.

Zhao et al., PCL: purified contrastive learning with global and local representation,
TGRS 62, 2024, doi 10.1109/TGRS.2024.3409378 (docs/METHOD.md section 1).
Both branches read the same patch x: (N, B, P, P), B bands, P odd >= 5; each gets
its own NT-Xent loss during pretraining.

- global branch: spectral stem (three Conv3d with (k,1,1) kernels over bands) ->
  two parallel 2-D stacks (3x3 and 5x5) -> 1x1 fuse into a 5x5 grid of tokens ->
  `depth` pre-norm blocks (conv-qkv spatial attention, channel attention, FFN)
  -> mean over tokens = global_feat (N, dim); global_z = L2-normalised global_feat.
- local branch: ResNet (3x3 stem over all bands, no max-pool) -> global average
  pool = local_feat (N, widths[-1]); projection MLP -> local_z, L2-normalised.

Choices where the paper is silent (each is a config key or documented here):
- spectral convs use "same" zero padding (k // 2), so B bands leave the stem as
  ceil(B / s1) (s1 the first stride: 204 -> 102 in the paper preset) and any
  B >= 1 works; convs followed by BatchNorm have no bias.
- each 2-D stack is conv1x1 -> dim/4, conv kxk -> dim/2, MaxPool2d(3, stride 2,
  pad 1), conv kxk -> dim, AdaptiveAvgPool2d(tokens); every conv is conv-BN-ReLU.
  The adaptive pool makes any patch size give a `tokens` x `tokens` grid (for
  P = 15: 15 -> 8 -> 5; for P < 9 the map is smaller than 5 x 5 before it, and
  the pool repeats cells).
- the fuse is a plain 1x1 conv (2*dim -> dim, with bias) plus a learned position
  embedding (1, dim, 5, 5), init trunc-normal std 0.02.
- the transformer works on the 25 tokens as (N, T, dim); its 1x1 convs (qkv,
  output projections, FFN) are per-token Linear layers, the same map. qkv of
  both attentions: Linear (no bias) then a depthwise 3x3 conv on the token grid
  (Restormer MDTA). Channel attention L2-normalises q and k along the tokens and
  scales by a learned per-head temperature (init 1). Pre-norm is LayerNorm per
  token; a final LayerNorm precedes the token mean (usual for pre-norm).
- ResNet convs use torchvision's init (Kaiming normal, fan_out); the projection
  MLP is Linear (no bias) -> BatchNorm1d -> ReLU -> Linear.

Speed (`set_fast`, default fast; the weights are the same in both forms, and the
tests check the two agree in outputs, gradients and BatchNorm statistics):
- spectral stem: a (k,1,1) Conv3d on (N, C, B, H, W) is a Conv2d with kernel (k, 1) on
  (N, C, B, H*W), and BatchNorm3d is BatchNorm over that 4-D view. On CPU the stem and
  the stacks' merged 1x1 convs run as one autograd Function (_StemReduceCPU) in a band-last
  layout ((N, C, HW, B') channels-last, each conv a (1, k) Conv2d, the reduce a plain
  matmul), BatchNorm as a few vectorised passes over the (N*HW*B', C) rows, and only each
  layer's conv output kept for backward (autograd's form keeps the ReLU output too: 376 MB
  per layer for 512 paper-preset patches). On CUDA the Conv2d form runs through autograd.
  Reference: F.conv3d (spectral_conv3d) and BatchNorm on 5-D tensors.
- attention (`attention`): F.scaled_dot_product_attention on CUDA; on CPU softmax(q k^T s) v
  written out, as PyTorch's fused CPU kernel is slower at these tiny sequences, forward and
  backward (bench.micro times both). Reference: the written-out form. The conv-qkv output is made
  contiguous along the tokens first (the channel attention normalises along them). The channel
  attention on CPU under bf16 autocast scales its (d, d) scores by the inverse norms of q and k
  instead of normalising q and k (`cosine_attention`; reference: F.normalize, then the
  written-out form).
- the stacks on CPU read channels-last copies of their slices of the pixel stage (NHWC convs
  and max-pool, also under bf16 autocast, where the stem's Conv2d form gives NCHW maps).
- the two stacks' first 1x1 convs read the same (N, C*B', P, P) input and run as one.
- local branch on CPU: channels-last input (oneDNN's NHWC convs); its 3x3 convs on maps of
  at most 2 x 2 pixels (the paper preset's last stage) run as one dense matmul
  (SmallMapConv2d).
- `pixel_map`: in eval mode the band projection, stem and the stacks' 1x1 conv + BN + ReLU
  act on each pixel alone, so a scene's map is computed once per pixel and cut into
  patches (`features(x, pixel)`), not once per patch containing the pixel (P^2 times).
`set_low_memory` (training, same numbers): the CPU stem keeps only its input and
BatchNorm statistics and recomputes each layer in backward (float32 only: under CPU bf16
autocast, `--cpu_amp`, the stem runs through autograd), and each transformer block reruns in
backward (activation checkpointing; blocks have no BatchNorm).
"""
import functools
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from utils.errors import UserError

PRESETS = {
    # the authors' sizes
    "paper": {
        "dim": 128,               # token width of the global branch
        "depth": 6,               # transformer blocks
        "heads": 4,               # heads of both attentions
        "ffn_ratio": 4,           # FFN hidden = ffn_ratio * dim
        "tokens": 5,              # token grid side
        "stem_channels": 8,       # channels of the spectral 3-D stem
        "stem_kernels": [7, 5, 3],  # band kernel sizes
        "stem_strides": [2, 1, 1],  # band strides
        "stack_kernels": [3, 5],  # one parallel 2-D stack per kernel size
        "resnet_widths": [64, 128, 256, 512],
        "resnet_blocks": [2, 2, 2, 2],
        "proj_hidden": 256,       # local projection MLP
        "proj_dim": 128,
        "band_proj": 0,           # 0: both branches read all bands, as in the paper
    },
    # same structure, sized to pretrain on a 2-core CPU (about 1.1 s per 256-anchor step):
    # the full-band stems dominate CPU time, so a learned projection to 32 bands comes first
    "small": {
        "dim": 32,
        "depth": 2,
        "heads": 4,
        "ffn_ratio": 4,
        "tokens": 5,
        "stem_channels": 4,
        "stem_kernels": [7, 5, 3],
        "stem_strides": [2, 1, 1],
        "stack_kernels": [3, 5],
        "resnet_widths": [16, 32, 64],
        "resnet_blocks": [1, 1, 1],
        "proj_hidden": 64,
        "proj_dim": 32,
        # learned 1x1 conv (+BN) from all bands to 32 before both branches: the full-band stems
        # are most of the CPU cost; the paper preset has none
        "band_proj": 32,
    },
}


class SpectralBatchNorm(nn.BatchNorm3d):
    """BatchNorm3d that also takes the (N, C, B, H*W) layout.

    Statistics are per channel over every other axis, so BN over (N, C, B, H, W)
    equals BN over (N, C, B, H*W); parameters and buffers are BatchNorm3d's.
    """

    def _check_input_dim(self, input):
        if input.dim() not in (4, 5):
            raise ValueError(f"expected a 4-D or 5-D input, got {input.dim()}-D")


def spectral_conv3d(x, weight, stride, padding):
    """F.conv3d with a (k,1,1) kernel over bands: (N, C_in, B, H, W) -> (N, C_out, B', H, W).

    PyTorch 2.13's CPU Conv3d returns a wrong (run-to-run varying) weight gradient when the
    band count is at most the kernel size (seen for k = 7, stride 2, B = 5..7; tested in
    tests/test_encoder.py); there the same conv runs as a Conv2d with kernel (k, 1).
    """
    N, _, B, H, W = x.shape
    if x.device.type == "cpu" and B <= weight.shape[2]:
        z = F.conv2d(x.flatten(3), weight.squeeze(-1), stride=(stride, 1), padding=(padding, 0))
        return z.unflatten(3, (H, W))
    return F.conv3d(x, weight, stride=(stride, 1, 1), padding=(padding, 0, 0))


class _ChannelsLastCopy(torch.autograd.Function):
    """x.contiguous(channels_last) whose gradient comes back contiguous (NCHW), as x was.

    Autograd's copy hands the conv's channels-last gradient straight to the NCHW ReLU and
    BatchNorm backward before it, whose kernels then read two layouts at once (slow, in bf16
    most of all); one copy back to NCHW is cheaper.
    """

    @staticmethod
    def forward(ctx, x):
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class SpectralConvBN(nn.Module):
    """Conv3d with kernel (k, 1, 1) over bands, BatchNorm, ReLU.

    The weight is stored in Conv3d form (C_out, C_in, k, 1, 1). A (k,1,1) Conv3d
    on (N, C, B, H, W) equals a Conv2d with kernel (k, 1), stride (s, 1) on
    (N, C, B, H*W), and BatchNorm3d equals BatchNorm over that 4-D view.
    Reference path: (N, C_in, B, H, W) -> (N, C_out, B', H, W) by F.conv3d.
    Fast path: (N, C_in, B, H*W) -> (N, C_out, B', H*W) by the Conv2d form, except
    a 5-D input (the first layer), which gives (N, C_out, B', H*W) by F.conv3d.
    B' = floor((B - 1) / s) + 1.
    """

    def __init__(self, c_in, c_out, kernel, stride):
        super().__init__()
        self.stride, self.padding = stride, kernel // 2
        self.conv = nn.Conv3d(c_in, c_out, (kernel, 1, 1), stride=(stride, 1, 1),
                              padding=(self.padding, 0, 0), bias=False)
        self.bn = SpectralBatchNorm(c_out)
        self.fast = True

    def forward(self, x):
        if self.fast and x.dim() == 5:
            # first layer, x: (N, 1, B, H, W); with one input channel oneDNN's Conv3d
            # beats the Conv2d form (measured on CPU); continue in the 4-D layout
            x = spectral_conv3d(x, self.conv.weight, self.stride, self.padding).flatten(3)  # (N, C_out, B', H*W)
        elif self.fast:
            # x: (N, C_in, B, H*W). On CPU, oneDNN's channels-last Conv2d is 2-3x faster
            # than NCHW here; BatchNorm stays NCHW (CPU channels-last BatchNorm is slower
            # and loses ~1e-3 relative accuracy over ~1e6 values per channel)
            cpu = x.device.type == "cpu"
            if cpu:
                x = _ChannelsLastCopy.apply(x)
            x = F.conv2d(x, self.conv.weight.squeeze(-1), stride=(self.stride, 1),
                         padding=(self.padding, 0))  # (N, C_out, B', H*W)
            if cpu:
                x = x.contiguous()
        else:
            # x: (N, C_in, B, H, W)
            x = spectral_conv3d(x, self.conv.weight, self.stride, self.padding)  # (N, C_out, B', H, W)
        # BN does not need its output for backward, so ReLU may overwrite it
        return F.relu(self.bn(x), inplace=self.fast)


class SpectralStem(nn.Module):
    """Three spectral conv-BN-ReLU layers, then channels x bands flattened.

    x: (N, B, H, W) -> (N, C * B', H, W), B' the band count after the strides.
    """

    def __init__(self, n_bands, channels, kernels, strides):
        super().__init__()
        layers, c_in, bands = [], 1, n_bands
        for k, s in zip(kernels, strides):
            layers.append(SpectralConvBN(c_in, channels, k, s))
            c_in, bands = channels, (bands - 1) // s + 1
        self.layers = nn.ModuleList(layers)
        self.out_channels = channels * bands
        self.low_memory = False  # fast CPU form: recompute the conv outputs in backward (set_low_memory)

    def forward(self, x):
        N, B, H, W = x.shape
        h = x.unsqueeze(1)  # (N, 1, B, H, W)
        for layer in self.layers:
            h = layer(h)  # fast: (N, C, B', H*W); reference: (N, C, B', H, W)
        return h.reshape(N, -1, H, W)  # (N, C*B', H, W)


def _wide(rows):
    """(M, C) contiguous rows -> a (M/k, k*C) view of the same memory, k*C near 128.

    Per-channel passes (BatchNorm's sums, multiply-adds, ReLU) over (M, C) rows with C = 8
    run an 8-wide inner loop, shorter than one AVX-512 register; the wide view gives the
    vectorised kernels full rows (`python -m bench.micro` times both). Per-channel vectors
    are tiled k times to match (`_tile`), and sums over the wide rows fold back with `_fold`.
    """
    m, c = rows.shape
    k = max(1, 128 // c)
    while m % k:
        k //= 2
    return rows.view(m // k, k * c)


def _tile(v, wide):
    """Per-channel (C,) vector -> (k*C,) to broadcast over the rows of `wide` (M/k, k*C)."""
    return v.repeat(wide.shape[1] // v.shape[0])


def _fold(v, c):
    """(k*C,) sums over wide rows -> (C,) per-channel sums."""
    return v.view(-1, c).sum(0)


def _batch_stats(bn, z_rows, scratch=None):
    """BatchNorm statistics of z_rows (M, C): (mean, invstd) used to normalise, as nn.BatchNorm.

    Training: the batch's mean and biased variance (two-pass), and the running statistics
    updated as nn.BatchNorm updates them (momentum, unbiased variance, batch count).
    Eval: the running statistics. scratch: optional dead (M, C) buffer for the centred rows
    (a fresh buffer costs page faults: `python -m bench.micro` compares the two).
    """
    if not bn.training and bn.running_mean is not None:
        return bn.running_mean.clone(), (bn.running_var + bn.eps).rsqrt()
    m, c = z_rows.shape
    wide = _wide(z_rows)                                         # (M/k, k*C)
    mean = _fold(wide.sum(0), c) / m                             # (C,)
    centred = torch.sub(wide, _tile(mean, wide), out=None if scratch is None else _wide(scratch))
    var = _fold(centred.square_().sum(0), c) / m                 # (C,) biased
    del centred
    if bn.training and bn.track_running_stats:
        momentum = bn.momentum if bn.momentum is not None else 0.0
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        with torch.no_grad():
            bn.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(var * (m / max(m - 1, 1)), alpha=momentum)
    return mean, (var + bn.eps).rsqrt()


def _bn_relu_rows(bn, z_rows, mean, invstd, out=None):
    """relu(BN(z)) for z_rows (M, C) -> (M, C), new or written to `out` (M, C): one multiply-add
    and one clamp pass."""
    scale = bn.weight * invstd                                   # (C,)
    shift = bn.bias - mean * scale                               # (C,)
    wide = _wide(z_rows)
    a = torch.addcmul(_tile(shift, wide), wide, _tile(scale, wide), out=None if out is None else _wide(out))
    return a.clamp_(min=0).view(z_rows.shape)


def _band_last(x):
    """(N, B, H, W) patches -> (N, 1, H*W, B) channels-last: each pixel's spectrum contiguous."""
    N, B, H, W = x.shape
    return x.reshape(N, B, H * W).transpose(1, 2).unsqueeze(1).contiguous(memory_format=torch.channels_last)


def _band_conv(h, layer):
    """Layer `layer`'s (k,1,1) spectral conv in the band-last layout, by a (1, k) Conv2d.

    h: (N, C_in, HW, B) channels-last -> (N, C_out, HW, B') channels-last, whose memory is
    (N, HW, B', C_out): rows of one pixel's one band, and each pixel's B'*C values contiguous.
    """
    w = layer.conv.weight                                        # (C_out, C_in, k, 1, 1)
    return F.conv2d(h, w.view(w.shape[0], w.shape[1], 1, w.shape[2]), stride=(1, layer.stride),
                    padding=(0, layer.padding))


def _rows(t):
    """(N, C, HW, B) tensor -> its (N*HW*B, C) rows, contiguous: a view when t is channels-last
    (always here, except that oneDNN may pick other strides for size-1 dims: then a copy)."""
    rows = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return rows if rows.is_contiguous() else rows.contiguous()


def _unrows(rows, like):
    """(N*HW*B, C) rows -> (N, C, HW, B) channels-last view, shaped like `like`."""
    N, C, HW, B = like.shape
    return rows.view(N, HW, B, C).permute(0, 3, 1, 2)


class _StemReduceCPU(torch.autograd.Function):
    """Spectral stem then the stacks' merged 1x1 reduce conv, on CPU, keeping little for backward.

    x: (N, B, H, W) -> (N, R, H, W), R = rows of reduce_weight (R, C*B', 1, 1). Computes
    SpectralStem + F.conv2d(., reduce_weight) in a band-last layout: every activation is
    (N, C, HW, B') channels-last, so each pixel's B'*C values are one contiguous row of the
    reduce matmul, and each (k,1,1) conv is a (1, k) Conv2d (oneDNN, no layout copies).
    BatchNorm runs as a few vectorised passes over the (N*HW*B', C) rows. Autograd's form
    keeps each layer's conv output *and* ReLU output for backward (376 MB each for 512
    paper-preset patches); this keeps the conv outputs z only and rebuilds
    relu(z * scale + shift) in backward (low-memory mode: not even z).
    """

    @staticmethod
    def forward(ctx, x, reduce_weight, stem, *params):
        N, B, H, W = x.shape
        h = x_t = _band_last(x)                                   # (N, 1, HW, B)
        zs, stats = [], []
        for layer in stem.layers:
            z = _band_conv(h, layer)                              # (N, C, HW, B') channels-last
            # the conv's input h is dead now (unless it is x_t, kept for backward): when it has
            # z's size, reuse it for the centred rows and then for this layer's output
            spare = _rows(h) if h is not x_t and h.numel() == z.numel() else None
            mean, invstd = _batch_stats(layer.bn, _rows(z), spare)
            h = _unrows(_bn_relu_rows(layer.bn, _rows(z), mean, invstd, spare), z)
            if not stem.low_memory:
                zs.append(z)
            del z
            stats.append((mean, invstd))
        C, Bp, R = h.shape[1], h.shape[3], reduce_weight.shape[0]
        rows = _rows(h).view(N * H * W, Bp * C)                   # (N*HW, B'*C), column b*C + c
        del h
        w_bc = reduce_weight.reshape(R, C, Bp).transpose(1, 2).reshape(R, Bp * C)
        out = (rows @ w_bc.t()).view(N, H, W, R).permute(0, 3, 1, 2)  # (N, R, H, W) channels-last
        ctx.stem, ctx.stats, ctx.shape = stem, stats, (N, B, H, W)
        ctx.batch_stats = [layer.bn.training or layer.bn.running_mean is None for layer in stem.layers]
        ctx.recompute = stem.low_memory
        ctx.save_for_backward(x_t, reduce_weight, *zs)  # x_t: what backward needs of x, as x's size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_t, reduce_weight, *zs = ctx.saved_tensors                      # x_t: (N, 1, HW, B)
        N, B, H, W = ctx.shape
        layers, stats = list(ctx.stem.layers), ctx.stats

        def relu_bn(i, z):  # layer i's output a_i from its conv output, (N, C, HW, B')
            return _unrows(_bn_relu_rows(layers[i].bn, _rows(z), *stats[i]), z)

        def conv_input_and_output(i):  # (input of layer i's conv, its output z_i)
            if not ctx.recompute:
                return (x_t if i == 0 else relu_bn(i - 1, zs[i - 1])), zs[i]
            h = x_t  # low-memory mode: run the layers again up to i, with the forward's statistics
            for j in range(i + 1):
                z = _band_conv(h, layers[j])
                if j < i:
                    h = relu_bn(j, z)
            return h, z

        top = len(layers) - 1
        inp, z = conv_input_and_output(top)
        a = relu_bn(top, z)                                               # (N, C, HW, B')
        R, C, Bp = reduce_weight.shape[0], a.shape[1], a.shape[3]
        g_rows = grad_out.permute(0, 2, 3, 1).reshape(N * H * W, R)      # (N*HW, R)
        g_reduce = (g_rows.t() @ _rows(a).view(N * H * W, Bp * C)).view(R, Bp, C).transpose(1, 2)
        g_reduce = g_reduce.reshape(reduce_weight.shape)
        w_bc = reduce_weight.reshape(R, C, Bp).transpose(1, 2).reshape(R, Bp * C)
        g_a = _unrows((g_rows @ w_bc).view(-1, C), a)                    # (N, C, HW, B') channels-last
        grads = []
        for i in reversed(range(len(layers))):
            layer, bn = layers[i], layers[i].bn
            mean, invstd = stats[i]
            g = _wide(_rows(g_a))                                         # (M/k, k*C), ours to overwrite
            a_wide = _wide(_rows(a))
            torch.ops.aten.threshold_backward.grad_input(g, a_wide, 0, grad_input=g)  # ReLU backward
            z_wide, m = _wide(_rows(z)), N * H * W * z.shape[3]
            g_beta = _fold(g.sum(0), C)                                   # (C,)
            g_z_sum = _fold(torch.mul(g, z_wide, out=a_wide).sum(0), C)  # a is dead: its buffer is scratch
            del a, a_wide
            g_gamma = (g_z_sum - mean * g_beta) * invstd                  # sum of g * x_hat
            k1 = bn.weight * invstd                                       # dz = k1 g + k2 z + k3, in place
            g.mul_(_tile(k1, g))
            if ctx.batch_stats[i]:
                k2 = -k1 * invstd * g_gamma / m
                k3 = -k1 * (g_beta - mean * invstd * g_gamma) / m
                g.addcmul_(z_wide, _tile(k2, g)).add_(_tile(k3, g))
            g_z = _unrows(g.view(-1, C), z)
            del z, z_wide, g
            w = layer.conv.weight
            need_input = i > 0 or ctx.needs_input_grad[0]
            g_a, g_w, _ = torch.ops.aten.convolution_backward(
                g_z, inp, w.view(w.shape[0], w.shape[1], 1, w.shape[2]), None, [1, layer.stride],
                [0, layer.padding], [1, 1], False, [0, 0], 1, [need_input, True, False])
            grads = [g_w.view(w.shape), g_gamma, g_beta] + grads
            del g_z
            if i > 0:
                a = inp                                                   # a_{i-1}: this conv's input
                del inp
                inp, z = conv_input_and_output(i - 1)
        g_x = None
        if ctx.needs_input_grad[0]:                                       # (N, 1, HW, B) -> (N, B, H, W)
            g_x = g_a.reshape(N, H * W, B).transpose(1, 2).reshape(N, B, H, W)
        return (g_x, g_reduce, None, *grads)


def stem_reduce_cpu(stem, reduce_weight, x):
    """SpectralStem then a 1x1 conv by reduce_weight (R, C*B', 1, 1), by _StemReduceCPU.

    x: (N, B, H, W) -> (N, R, H, W). Only for plain BatchNorm layers (not SyncBatchNorm).
    """
    params = [t for layer in stem.layers for t in (layer.conv.weight, layer.bn.weight, layer.bn.bias)]
    return _StemReduceCPU.apply(x, reduce_weight, stem, *params)


def conv_bn_relu(c_in, c_out, kernel):
    """kxk conv ("same" padding, no bias) -> BatchNorm2d -> ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class TokenStack(nn.Module):
    """One 2-D stack: 1x1 -> dim/4, kxk -> dim/2, pool, kxk -> dim, pool to a grid.

    (N, C_in, P, P) -> (N, dim, tokens, tokens) for any P.
    """

    def __init__(self, c_in, dim, kernel, tokens):
        super().__init__()
        self.reduce = conv_bn_relu(c_in, dim // 4, 1)
        self.body = nn.Sequential(
            conv_bn_relu(dim // 4, dim // 2, kernel),
            nn.MaxPool2d(3, stride=2, padding=1),
            conv_bn_relu(dim // 2, dim, kernel),
            nn.AdaptiveAvgPool2d(tokens),
        )

    def forward(self, x):
        return self.body(self.reduce(x))


class ConvQKV(nn.Module):
    """q, k, v of the tokens: a pointwise Linear (a 1x1 conv) then a depthwise 3x3 conv on the grid.

    x: (N, T, C) tokens of a grid x grid map -> (N, 3C, T).
    """

    def __init__(self, dim, grid):
        super().__init__()
        self.grid = grid
        self.pointwise = nn.Linear(dim, 3 * dim, bias=False)
        self.depthwise = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=False)
        self.fast = True

    def forward(self, x):
        qkv = self.pointwise(x)  # (N, T, 3C)
        qkv = qkv.transpose(1, 2).unflatten(2, (self.grid, self.grid))  # (N, 3C, g, g), channels-last memory
        qkv = self.depthwise(qkv).flatten(2)  # (N, 3C, T), T the strided axis
        # fast: T contiguous, so the channel attention's norms over T and both attentions'
        # head splits read contiguous memory (one copy instead of strided passes)
        return qkv.contiguous() if self.fast else qkv


def explicit_attention(q, k, v, scale):
    """softmax(q k^T * scale) v. q: (..., L, E), k: (..., S, E), v: (..., S, Ev) -> (..., L, Ev)."""
    return ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v


def inverse_norm(t, eps=1e-12):
    """1 / max(|t|, eps) along the last axis, as F.normalize divides: (..., L, E) -> (..., L, 1).
    float32 and bf16 (eps^2 = 1e-24 underflows to 0 in float16, where a zero row would give inf)."""
    return t.square().sum(dim=-1, keepdim=True).clamp_min(eps * eps).rsqrt()


def cosine_attention(q, k, v, temperature):
    """softmax(temperature * q_hat k_hat^T) v, q_hat and k_hat q and k L2-normalised along the
    last axis (F.normalize). q, k: (..., L, E), v: (..., L, Ev), temperature broadcast over
    the (..., L, L) scores -> (..., L, Ev).

    The norms scale the scores, (q k^T)_ij / (|q_i| |k_j|), instead of dividing q and k: the
    same values up to rounding (in bf16 it rounds differently from normalise-then-attend) with
    fewer passes over the (..., L, E) inputs. `python -m bench.micro`, the
    channel attention's heads of 64 patches, forward + backward: half the time under CPU bf16
    autocast (where dividing the strided bf16 slices is slow), the same in float32.
    """
    scale = inverse_norm(q) * temperature.to(q.dtype) * inverse_norm(k).transpose(-2, -1)  # (..., L, L)
    return ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v


def fused_attention_available(t):
    """Whether `attention` runs F.scaled_dot_product_attention for t (on CUDA) rather than the
    written-out form (tests patch it to check the fused path's arrangement on CPU)."""
    return t.is_cuda


def attention(q, k, v, scale):
    """The fast form of explicit_attention (same shapes, same values within float error).

    F.scaled_dot_product_attention on CUDA (fused kernels, bf16 under autocast); on CPU the
    written-out form, which is faster there at these tiny sequences (L, S <= 32), forward and
    backward alike (bench.micro times both).
    """
    if fused_attention_available(q):  # they need the last axis contiguous (the spatial heads' is strided)
        return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), scale=scale)
    return explicit_attention(q, k, v, scale)


class SpatialAttention(nn.Module):
    """Multi-head self-attention between the T tokens, with convolutional qkv.

    x: (N, T, C) -> (N, T, C); heads of width d = C / heads, scale d^-1/2.
    """

    def __init__(self, dim, heads, grid):
        super().__init__()
        self.heads = heads
        self.qkv = ConvQKV(dim, grid)
        self.proj = nn.Linear(dim, dim)
        self.fast = True

    def forward(self, x):
        N, T, C = x.shape
        d = C // self.heads
        qkv = self.qkv(x).reshape(N, 3, self.heads, d, T)  # (N, 3, heads, d, T)
        q, k, v = qkv.transpose(-2, -1).unbind(1)  # each (N, heads, T, d)
        out = (attention if self.fast else explicit_attention)(q, k, v, d ** -0.5)  # (N, heads, T, d)
        return self.proj(out.transpose(1, 2).reshape(N, T, C))  # (N, T, C)


class ChannelAttention(nn.Module):
    """Transposed (channel) attention, Restormer/XCiT style, with convolutional qkv.

    Per head, a d x d map between channels: softmax(t * q_hat k_hat^T) with q, k
    L2-normalised along the tokens and t a learned per-head temperature.
    x: (N, T, C) -> (N, T, C).
    """

    def __init__(self, dim, heads, grid):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = ConvQKV(dim, grid)
        self.proj = nn.Linear(dim, dim)
        self.fast = True

    def forward(self, x):
        N, T, C = x.shape
        qkv = self.qkv(x).reshape(N, 3, self.heads, C // self.heads, T)  # (N, 3, heads, d, T)
        q, k, v = qkv.unbind(1)  # each (N, heads, d, T)
        if not self.fast:
            out = explicit_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, self.temperature)
        elif q.dtype == torch.bfloat16 and not fused_attention_available(q):
            # CPU bf16 autocast: dividing these strided bf16 slices is slow, so scale the scores
            out = cosine_attention(q, k, v, self.temperature)  # (N, heads, d, T)
        else:  # float32 (no faster the other way, and its numbers stay those of earlier releases);
            # CUDA, whose fused kernels take a scalar scale: norms and temperature go into q and k
            q = F.normalize(q, dim=-1) * self.temperature.to(q.dtype)  # q's dtype, whatever autocast made it
            out = attention(q, F.normalize(k, dim=-1), v, 1.0)
        return self.proj(out.reshape(N, C, T).transpose(1, 2))  # (N, T, C)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + spatial attn, x + channel attn, x + FFN. x: (N, T, C) -> (N, T, C).

    The FFN's 1x1 convs are per-token Linear layers (the same map, and faster).
    """

    def __init__(self, dim, heads, ffn_ratio, grid):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.spatial = SpatialAttention(dim, heads, grid)
        self.norm2 = nn.LayerNorm(dim)
        self.channel = ChannelAttention(dim, heads, grid)
        self.norm3 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_ratio * dim), nn.GELU(), nn.Linear(ffn_ratio * dim, dim))

    def forward(self, x):
        x = x + self.spatial(self.norm1(x))
        x = x + self.channel(self.norm2(x))
        return x + self.ffn(self.norm3(x))


class GlobalBranch(nn.Module):
    """Spectral stem -> 3x3 and 5x5 stacks -> tokens -> transformer -> mean.

    x: (N, B, P, P) -> (N, dim).
    """

    def __init__(self, n_bands, dim, depth, heads, ffn_ratio, tokens, stem_channels,
                 stem_kernels, stem_strides, stack_kernels):
        super().__init__()
        self.stem = SpectralStem(n_bands, stem_channels, stem_kernels, stem_strides)
        self.stacks = nn.ModuleList(TokenStack(self.stem.out_channels, dim, k, tokens)
                                    for k in stack_kernels)
        self.fuse = nn.Conv2d(len(stack_kernels) * dim, dim, 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, tokens, tokens))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, ffn_ratio, tokens) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.fast = True

    def pixel_stage(self, x):
        """The per-pixel part: spectral stem, then each stack's 1x1 conv, BatchNorm and ReLU.

        x: (N, B, H, W), any H and W -> (N, S*dim/4, H, W). Each output pixel depends on
        the same input pixel only, so in eval mode a scene's map can be computed once
        (`PCLEncoder.pixel_map`) and cut into patches, instead of once per patch.
        """
        if not self.fast:
            h = self.stem(x)  # (N, C*B', H, W)
            return torch.cat([stack.reduce(h) for stack in self.stacks], dim=1)
        # the stacks' first 1x1 convs read the same wide input: run them as one conv
        w = torch.cat([stack.reduce[0].weight for stack in self.stacks])  # (S*dim/4, C*B', 1, 1)
        plain_bn = all(type(layer.bn) is SpectralBatchNorm for layer in self.stem.layers)
        # under CPU bf16 autocast (--cpu_amp) autograd's bf16 stem is faster than this float32 Function
        if x.device.type == "cpu" and plain_bn and not torch.is_autocast_enabled("cpu"):
            r = stem_reduce_cpu(self.stem, w, x)  # (N, S*dim/4, H, W), less memory kept for backward
        else:
            r = F.conv2d(self.stem(x), w)  # (N, S*dim/4, H, W)
        parts = r.split(w.shape[0] // len(self.stacks), dim=1)
        if r.device.type == "cpu":
            # each stack gets a channels-last copy of its slice (small copies): the stacks then
            # run oneDNN's NHWC convs and max-pool (CPU max-pool over NCHW maps, as the Conv2d
            # form above gives, is ~15x slower forward), and BatchNorm reads contiguous memory
            # (a channel slice of the Function's channels-last map is contiguous in no layout,
            # and CPU BatchNorm's strided path is ~10x slower); `python -m bench.micro`
            parts = [part.contiguous(memory_format=torch.channels_last) for part in parts]
        return torch.cat([stack.reduce[1:](part) for stack, part in zip(self.stacks, parts)], dim=1)

    def forward(self, x, pixel=None):
        """x: (N, B, P, P) -> (N, dim); pixel: its pixel_stage if already computed (then x is unused)."""
        pixel = self.pixel_stage(x) if pixel is None else pixel  # (N, S*dim/4, P, P)
        return self.norm(self.forward_blocks(self.tokens(pixel))).mean(dim=1)  # (N, dim)

    def tokens(self, pixel):
        """The stacks' bodies, fuse and position embedding: (N, S*dim/4, P, P) -> (N, T=25, dim)."""
        parts = pixel.split(pixel.shape[1] // len(self.stacks), dim=1)
        h = torch.cat([stack.body(part) for stack, part in zip(self.stacks, parts)], dim=1)  # (N, S*dim, 5, 5)
        h = self.fuse(h) + self.pos_embed  # (N, dim, 5, 5)
        return h.flatten(2).transpose(1, 2)  # (N, T=25, dim)

    def forward_blocks(self, tokens):
        """The transformer blocks: (N, T, dim) -> (N, T, dim); checkpointed in low-memory mode."""
        if not (self.stem.low_memory and torch.is_grad_enabled()):
            return self.blocks(tokens)
        for block in self.blocks:  # keep each block's input only, rerun the block in backward
            tokens = checkpoint(block, tokens, use_reentrant=False)
        return tokens


@functools.lru_cache(maxsize=None)
def _tap_picker(H, W):
    """One-hot (HW*HW, 9): for each (output pixel, input pixel) pair of an H x W map (H, W <= 2),
    the 3x3 tap that links them, row-major over the kernel. Built once per map size."""
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()                                  # (HW,) pixel coordinates
    taps = (ys[None, :] - ys[:, None] + 1) * 3 + xs[None, :] - xs[:, None] + 1  # (HW_out, HW_in), 0..8
    return F.one_hot(taps.flatten(), 9).float()


class SmallMapConv2d(nn.Conv2d):
    """3x3 stride-1 "same" Conv2d that, on maps of at most 2 x 2 pixels, runs as one matmul.

    On a map that small every output pixel sees every input pixel through some tap, so the
    conv is exactly a dense (HW*C_out, HW*C_in) matrix gathered from the 3x3 kernel: for the
    paper preset's last ResNet stage (512 channels, 2 x 2 after a 15-pixel patch) a
    (N, 2048) x (2048, 2048) matmul, 4.3 GFLOP per 512 patches against the 9.7 GFLOP oneDNN
    spends on a padded 3x3 conv, and at matmul speed. Same weights, same function: the
    reference form (`fast = False`), other sizes and other devices use nn.Conv2d.
    x: (N, C_in, H, W) -> (N, C_out, H, W), channels-last memory on the matmul path.
    """

    fast = True

    def forward(self, x):
        H, W = x.shape[-2:]
        if not (self.fast and x.device.type == "cpu" and H <= 2 and W <= 2 and self.stride == (1, 1)
                and self.kernel_size == (3, 3) and self.padding == (1, 1) and self.groups == 1
                and self.dilation == (1, 1) and self.padding_mode == "zeros"):
            return super().forward(x)
        N, C = x.shape[:2]
        # each (pixel out, pixel in) block is one tap's (C_out, C_in) matrix, picked by a one-hot
        # matmul: its gradient is a matmul too (indexing's scatter-add backward is far slower)
        pick = _tap_picker(H, W).to(self.weight.dtype)                   # (HW_out*HW_in, 9)
        per_tap = self.weight.permute(2, 3, 0, 1).reshape(9, self.out_channels * C)
        blocks = (pick @ per_tap).view(H * W, H * W, self.out_channels, C)  # (HW_out, HW_in, C_out, C_in)
        dense = blocks.permute(0, 2, 1, 3).reshape(H * W * self.out_channels, H * W * C)
        rows = x.permute(0, 2, 3, 1).reshape(N, H * W * C)               # (N, HW*C_in), pixel-major
        out = rows @ dense.t()                                           # (N, HW*C_out)
        if self.bias is not None:
            out = out + self.bias.repeat(H * W)
        return out.view(N, H, W, self.out_channels).permute(0, 3, 1, 2)  # (N, C_out, H, W)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity or 1x1-conv shortcut, ReLU."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = SmallMapConv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = SmallMapConv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity, inplace=True)


class LocalBranch(nn.Module):
    """ResNet with a 3x3 stride-1 stem over all bands and no max-pool.

    Stage 1 keeps the resolution, later stages halve it. x: (N, B, P, P) -> (N, widths[-1]).
    """

    def __init__(self, n_bands, widths, blocks):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(n_bands, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, c_in = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*(BasicBlock(c_in if j == 0 else width, width,
                                                     stride if j == 0 else 1) for j in range(n))))
            c_in = width
        self.stages = nn.Sequential(*stages)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # torchvision's ResNet init
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.fast = True

    def forward(self, x):
        if self.fast and x.device.type == "cpu":
            # channels-last input: oneDNN then runs every conv of the branch in NHWC, measured
            # 1.3-1.5x faster in the forward pass on CPU (same weights, same sums up to rounding)
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.stages(self.stem(x))  # (N, widths[-1], P', P')
        return h.mean(dim=(2, 3))  # (N, widths[-1])


class PCLEncoder(nn.Module):
    """Two-branch PCL encoder.

    n_bands: B; patch_size: P (odd, >= 5); preset: a key of PRESETS; `sizes`
    overrides single preset entries (build_encoder passes them all, so a saved
    config rebuilds the same network even if PRESETS change later).
    `self.config` is a JSON-serialisable dict that build_encoder accepts.
    """

    def __init__(self, n_bands, patch_size=15, preset="paper", fast=True, **sizes):
        super().__init__()
        if not isinstance(preset, str) or preset not in PRESETS:
            raise UserError(f"unknown encoder preset {preset!r:.40}; presets: {', '.join(PRESETS)}")
        unknown = set(sizes) - set(PRESETS[preset])
        if unknown:
            raise UserError(f"unknown encoder setting(s) {', '.join(sorted(unknown))}; "
                            f"valid: {', '.join(PRESETS[preset])}")
        n_bands, patch_size, cfg = _check_sizes(n_bands, patch_size, {**PRESETS[preset], **sizes})
        self.config = {"n_bands": n_bands, "patch_size": patch_size, "preset": preset, **cfg}
        branch_bands = cfg["band_proj"] or n_bands
        self.band_proj = nn.Identity() if not cfg["band_proj"] else nn.Sequential(
            nn.Conv2d(n_bands, branch_bands, 1, bias=False), nn.BatchNorm2d(branch_bands))
        self.global_branch = GlobalBranch(
            branch_bands, cfg["dim"], cfg["depth"], cfg["heads"], cfg["ffn_ratio"], cfg["tokens"],
            cfg["stem_channels"], cfg["stem_kernels"], cfg["stem_strides"], cfg["stack_kernels"])
        self.local_branch = LocalBranch(branch_bands, cfg["resnet_widths"], cfg["resnet_blocks"])
        width = cfg["resnet_widths"][-1]
        self.local_proj = nn.Sequential(
            nn.Linear(width, cfg["proj_hidden"], bias=False), nn.BatchNorm1d(cfg["proj_hidden"]),
            nn.ReLU(inplace=True), nn.Linear(cfg["proj_hidden"], cfg["proj_dim"]))
        self.set_fast(fast)

    @property
    def feature_dims(self):
        """(global width, local width): the two parts of `features`."""
        return self.config["dim"], self.config["resnet_widths"][-1]

    def set_low_memory(self, low_memory=True):
        """Trade time for memory in training, computing the same thing: the CPU spectral stem
        keeps only its input and BatchNorm statistics and recomputes its conv outputs in
        backward, and each transformer block reruns in backward (activation checkpointing;
        blocks have no BatchNorm, so nothing is updated twice)."""
        self.global_branch.stem.low_memory = bool(low_memory)
        return self

    def set_fast(self, fast=True):
        """Choose the fast (default) or literal reference computation; weights are shared."""
        for m in self.modules():
            if hasattr(m, "fast"):
                m.fast = bool(fast)
        return self

    def _check_input(self, x):
        P, B = self.config["patch_size"], self.config["n_bands"]
        if x.dim() != 4 or tuple(x.shape[1:]) != (B, P, P):
            raise ValueError(f"encoder expects patches (N, {B}, {P}, {P}), got {tuple(x.shape)}")

    def branch_features(self, x, pixel=None):
        """x: (N, B, P, P) -> (global_feat (N, dim), local_feat (N, widths[-1])).

        pixel: optional (N, R, P, P) patches of `pixel_map` (eval mode only): the global
        branch then starts after its per-pixel stage instead of recomputing it.
        """
        self._check_input(x)
        x = self.band_proj(x)  # (N, band_proj or B, P, P)
        return self.global_branch(x, pixel), self.local_branch(x)

    @torch.no_grad()
    def pixel_map(self, scene, pixels_per_chunk=4096):
        """The global branch's per-pixel stage at every pixel of a scene, in eval mode.

        scene: (B, H, W), e.g. PatchCutter.padded -> (R, H, W), R = pixel_channels. In eval
        mode the band projection, spectral stem and the stacks' 1x1 conv + BatchNorm + ReLU
        act on each pixel alone, so cutting a patch of this map gives what the patch's own
        forward pass computes, once per pixel instead of once per patch containing it
        (P^2 = 225 times). Computed a block of rows at a time (bounded memory).
        """
        if self.training:
            raise RuntimeError("pixel_map needs eval mode (training BatchNorm mixes pixels)")
        B, H, W = scene.shape
        step = max(1, pixels_per_chunk // W)
        blocks = []
        for top in range(0, H, step):
            x = self.band_proj(scene[None, :, top:top + step])                 # (1, B', rows, W)
            blocks.append(self.global_branch.pixel_stage(x)[0])               # (R, rows, W)
        return torch.cat(blocks, dim=1)

    @property
    def pixel_channels(self):
        """Channels R of pixel_map: the stacks' reduced widths, side by side."""
        return len(self.config["stack_kernels"]) * (self.config["dim"] // 4)

    def forward(self, x, pixel=None):
        """x: (N, B, P, P) -> dict of global_feat (N, dim), local_feat (N, W),
        global_z (N, dim) and local_z (N, proj_dim), the z's of unit L2 norm.
        pixel: see branch_features."""
        global_feat, local_feat = self.branch_features(x, pixel)  # (N, dim), (N, W)
        global_z = F.normalize(global_feat, dim=1)  # (N, dim)
        local_z = F.normalize(self.local_proj(local_feat), dim=1)  # (N, proj_dim)
        return {"global_feat": global_feat, "local_feat": local_feat,
                "global_z": global_z, "local_z": local_z}

    def features(self, x, pixel=None):
        """x: (N, B, P, P) -> (N, dim + W): global_feat and local_feat side by side.
        pixel: see branch_features."""
        return torch.cat(self.branch_features(x, pixel), dim=1)


_LIMITS = {"band_proj": 4096, "n_bands": 4096, "patch_size": 255, "dim": 4096, "depth": 64, "heads": 64, "ffn_ratio": 16,
           "tokens": 64, "stem_channels": 256, "proj_hidden": 8192, "proj_dim": 8192,
           "stem_kernels": 63, "stem_strides": 16, "stack_kernels": 15, "resnet_widths": 4096,
           "resnet_blocks": 64}


def _check_sizes(n_bands, patch_size, cfg):
    """Validate an architecture (it may come from a file's metadata); return it with plain ints and lists.

    Absurd sizes are refused too, so crafted metadata cannot make building hang or allocate.
    """
    def positive_int(v, key):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 1 <= v <= _LIMITS[key]:
            raise UserError(f"encoder setting {key} must be an integer in 1..{_LIMITS[key]}, got {v!r:.40}")
        return int(v)

    n_bands = positive_int(n_bands, "n_bands")
    patch_size = positive_int(patch_size, "patch_size")
    if patch_size < 5 or patch_size % 2 == 0:
        raise UserError(f"patch_size must be odd and >= 5, got {patch_size}")
    cfg = dict(cfg)
    cfg.setdefault("band_proj", 0)
    if cfg["band_proj"] != 0:
        cfg["band_proj"] = positive_int(cfg["band_proj"], "band_proj")
    for key in ("dim", "depth", "heads", "ffn_ratio", "tokens", "stem_channels", "proj_hidden", "proj_dim"):
        cfg[key] = positive_int(cfg[key], key)
    for key in ("stem_kernels", "stem_strides", "stack_kernels", "resnet_widths", "resnet_blocks"):
        if not isinstance(cfg[key], (list, tuple)) or not 1 <= len(cfg[key]) <= 8:
            raise UserError(f"encoder setting {key} must be a list of 1 to 8 integers, got {cfg[key]!r:.40}")
        cfg[key] = [positive_int(v, key) for v in cfg[key]]
    if len(cfg["stem_kernels"]) != len(cfg["stem_strides"]):
        raise UserError("encoder settings stem_kernels and stem_strides must have the same length")
    if len(cfg["resnet_widths"]) != len(cfg["resnet_blocks"]):
        raise UserError("encoder settings resnet_widths and resnet_blocks must have the same length")
    if cfg["dim"] % 4 or cfg["dim"] % cfg["heads"]:
        raise UserError(f"encoder dim ({cfg['dim']}) must be divisible by 4 and by heads ({cfg['heads']})")
    if any(k % 2 == 0 for k in cfg["stem_kernels"] + cfg["stack_kernels"]):
        raise UserError("encoder settings stem_kernels and stack_kernels must be odd")
    return n_bands, patch_size, cfg


def build_encoder(config):
    """Rebuild a PCLEncoder from its `config` dict (e.g. read from safetensors metadata)."""
    config = dict(config)
    missing = {"n_bands", "preset"} - set(config)
    if missing:
        raise UserError(f"encoder config lacks {', '.join(sorted(missing))}")
    n_bands, preset = config.pop("n_bands"), config.pop("preset")
    patch_size = config.pop("patch_size", 15)
    return PCLEncoder(n_bands, patch_size, preset, **config)


def count_parameters(module):
    """Number of parameters (trainable or not) in `module`."""
    return sum(p.numel() for p in module.parameters())


def describe(encoder):
    """One line: preset, input and the parameter count of each branch."""
    c = encoder.config
    g = count_parameters(encoder.global_branch)
    loc = count_parameters(encoder.local_branch)
    p = count_parameters(encoder.local_proj)
    widths = "-".join(map(str, c["resnet_widths"]))
    proj = f"band projection {c['n_bands']}->{c['band_proj']}, " if c.get("band_proj") else ""
    return (f"PCLEncoder preset={c['preset']} input {c['n_bands']}x{c['patch_size']}x{c['patch_size']}: {proj}"
            f"global {g / 1e6:.2f}M (dim {c['dim']}, depth {c['depth']}), "
            f"local {loc / 1e6:.2f}M (ResNet {widths}), projection {p / 1e6:.2f}M, "
            f"total {count_parameters(encoder) / 1e6:.2f}M parameters")
