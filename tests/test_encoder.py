"""PCL encoder: shapes, config round trip, fast path == reference path, errors."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.encoder import (PRESETS, ChannelAttention, ConvQKV, PCLEncoder, SpatialAttention, SpectralStem,
                            build_encoder, cosine_attention, count_parameters, describe, explicit_attention)
from utils.errors import UserError

torch.set_num_threads(min(2, torch.get_num_threads()))
BANDS = 32  # few bands keep the tests quick; one test uses 204


def make(preset="small", bands=BANDS, patch=9, seed=0, **sizes):
    torch.manual_seed(seed)
    return PCLEncoder(bands, patch, preset, **sizes)


def patches(n=6, bands=BANDS, patch=9, seed=1):
    return torch.randn(n, bands, patch, patch, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", ["small", "paper"])
@pytest.mark.parametrize("patch", [9, 15])
def test_output_shapes(preset, patch):
    enc = make(preset, patch=patch)
    x = patches(4, patch=patch)
    out = enc(x)
    dim, width = enc.feature_dims
    assert (dim, width) == (PRESETS[preset]["dim"], PRESETS[preset]["resnet_widths"][-1])
    assert out["global_feat"].shape == (4, dim) and out["global_z"].shape == (4, dim)
    assert out["local_feat"].shape == (4, width)
    assert out["local_z"].shape == (4, PRESETS[preset]["proj_dim"])
    assert enc.features(x).shape == (4, dim + width)
    for z in (out["global_z"], out["local_z"]):
        torch.testing.assert_close(z.norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("patch", [5, 7, 11])
def test_any_odd_patch_size(patch):
    enc = make(patch=patch).eval()
    with torch.no_grad():
        assert enc.features(patches(2, patch=patch)).shape == (2, sum(enc.feature_dims))


def test_features_are_the_branch_features():
    enc = make().eval()
    x = patches()
    with torch.no_grad():
        out, feats = enc(x), enc.features(x)
    torch.testing.assert_close(feats, torch.cat([out["global_feat"], out["local_feat"]], 1), rtol=0, atol=0)


def test_salinas_bands_train_step():
    """The real input size: 204 bands, 15 x 15, small preset, one backward pass."""
    enc = make(bands=204, patch=15)
    out = enc(patches(4, bands=204, patch=15))
    (out["global_z"].sum() + out["local_z"].sum()).backward()
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the small preset projects 204 bands to band_proj = 32 first, then its stem halves them
    assert enc.global_branch.stem.out_channels == PRESETS["small"]["stem_channels"] * 16
    assert SpectralStem(204, 8, [7, 5, 3], [2, 1, 1]).out_channels == 8 * 102  # the paper's stem


@pytest.mark.parametrize("preset", ["small", "paper"])
def test_build_encoder_round_trip(preset):
    enc = make(preset).eval()
    config = json.loads(json.dumps(enc.config))  # as stored in safetensors metadata
    assert config == enc.config
    assert {"n_bands", "patch_size", "preset"} <= set(config) and set(PRESETS[preset]) <= set(config)
    torch.manual_seed(123)  # a different init: only load_state_dict may make them equal
    twin = build_encoder(config).eval()
    assert twin.config == enc.config
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in enc.state_dict().items()}
    twin.load_state_dict(enc.state_dict(), strict=True)
    x = patches()
    with torch.no_grad():
        a, b = enc(x), twin(x)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_build_encoder_keeps_stored_sizes():
    """A saved config rebuilds its own sizes, not the preset's current ones."""
    enc = make(depth=1, resnet_widths=[16, 32, 64])
    twin = build_encoder(enc.config)
    assert len(twin.global_branch.blocks) == 1 and twin.feature_dims == (PRESETS["small"]["dim"], 64)


def test_build_on_meta_device():
    """utils.checkpoint.load_encoder builds a skeleton on the meta device first."""
    with torch.device("meta"):
        skeleton = build_encoder({"n_bands": 204, "patch_size": 15, "preset": "paper", **PRESETS["paper"]})
    assert all(p.is_meta for p in skeleton.parameters())


def test_deterministic_init():
    a, b, c = make(seed=0).state_dict(), make(seed=0).state_dict(), make(seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_preset_and_bad_settings():
    with pytest.raises(UserError, match="presets: paper, small"):
        PCLEncoder(BANDS, 9, "huge")
    with pytest.raises(UserError, match="presets"):
        build_encoder({"n_bands": BANDS, "patch_size": 9, "preset": "huge"})
    with pytest.raises(UserError, match="width"):
        PCLEncoder(BANDS, 9, "small", width=3)
    for patch in (4, 3, 10):
        with pytest.raises(UserError, match="patch_size"):
            PCLEncoder(BANDS, patch, "small")
    with pytest.raises(UserError, match="depth"):
        build_encoder({**make().config, "depth": 10 ** 9})
    with pytest.raises(UserError, match="heads"):
        PCLEncoder(BANDS, 9, "small", heads=3)


def test_wrong_input_shape():
    enc = make()
    with pytest.raises(ValueError, match=f"\\(N, {BANDS}, 9, 9\\)"):
        enc(patches(2, bands=BANDS + 1))


def test_count_and_describe():
    enc = make()
    parts = [enc.band_proj, enc.global_branch, enc.local_branch, enc.local_proj]
    assert count_parameters(enc) == sum(count_parameters(m) for m in parts) > 0
    line = describe(enc)
    assert "\n" not in line and "preset=small" in line and "global" in line and "local" in line
    assert f"band projection {BANDS}->{PRESETS['small']['band_proj']}" in line


# ---- fast path == reference path -------------------------------------------------------------

def assert_grads_close(fast, ref):
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        scale = q.grad.abs().max().item() + 1e-8
        err = (p.grad - q.grad).abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, f"{name}: max diff {err:.2e} (scale {scale:.2e})"


def assert_encoder_equals_reference(model, ref, x):
    """model and ref (the reference form, the same weights) agree on x: outputs in train mode
    (batch statistics), parameter gradients, BatchNorm running statistics (4-D vs 5-D buffers),
    then outputs in eval mode."""
    out_m, out_r = model(x), ref(x)
    for key in out_m:
        torch.testing.assert_close(out_m[key], out_r[key], rtol=1e-4, atol=1e-5)
    w = torch.randn(out_m["global_z"].shape)
    for net, out in ((model, out_m), (ref, out_r)):
        ((out["global_z"] * w).sum() + out["local_z"][:, 0].sum()).backward()
    assert_grads_close(model, ref)
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    model.eval(), ref.eval()
    with torch.no_grad():
        out_m, out_r = model(x), ref(x)
    for key in out_m:
        torch.testing.assert_close(out_m[key], out_r[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["small", "paper"])
def test_fast_equals_reference(preset):
    fast = make(preset)
    assert_encoder_equals_reference(fast, copy.deepcopy(fast).set_fast(False), patches(8))


@pytest.mark.parametrize("module", [
    lambda: SpectralStem(BANDS, 4, [7, 5, 3], [2, 1, 1]),
    lambda: SpatialAttention(32, 4, grid=5),
    lambda: ChannelAttention(32, 4, grid=5),
])
def test_fast_forms_per_module(module):
    torch.manual_seed(0)
    fast = module()
    ref = copy.deepcopy(fast)
    for m in ref.modules():
        if hasattr(m, "fast"):
            m.fast = False
    shape = (4, BANDS, 9, 9) if isinstance(fast, SpectralStem) else (4, 25, 32)
    x = torch.randn(shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    a, b = fast(x), ref(x_ref)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(a)
    a.backward(g), b.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    assert_grads_close(fast, ref)


@pytest.mark.parametrize("layout", ["spatial", "channel"])
def test_fused_attention_equals_the_written_out_form(layout):
    """The CUDA path (F.scaled_dot_product_attention) computes what the CPU's written-out form
    does, on q, k, v laid out as the encoder's attentions lay them out; values and gradients."""
    qkv = torch.randn(3, 3, 4, 8, 25, generator=torch.Generator().manual_seed(0))  # (N, 3, heads, d, T)
    if layout == "spatial":  # heads of T tokens of width d, scale d^-1/2
        parts, scale = qkv.transpose(-2, -1), 8 ** -0.5
    else:  # heads of d channels of length T, a per-head temperature folded into q
        parts, scale = qkv, 1.0
    outs, grads = [], []
    for fn in (F.scaled_dot_product_attention, explicit_attention):
        leaf = parts.clone().requires_grad_()
        q, k, v = leaf.unbind(1)
        if layout == "channel":
            q = F.normalize(q, dim=-1) * torch.tensor([0.5, 1.0, 2.0, 4.0]).view(4, 1, 1)
            k = F.normalize(k, dim=-1)
        out = fn(q, k, v, scale=scale)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        outs.append(out)
        grads.append(leaf.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert outs[1].shape == q.shape


@pytest.mark.parametrize("module", [SpatialAttention, ChannelAttention])
def test_attention_modules_fused_path_equals_the_reference(monkeypatch, module):
    """The modules' CUDA arrangement (q, k, v for F.scaled_dot_product_attention; the channel
    attention's norms and temperature folded into q and k), run on CPU by patching the switch:
    the reference form's values and gradients."""
    import models.encoder as encoder_module
    torch.manual_seed(0)
    fast = module(32, 4, grid=5)
    if module is ChannelAttention:
        with torch.no_grad():
            fast.temperature.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0]).view(4, 1, 1))
    ref = copy.deepcopy(fast)
    for m in ref.modules():
        if hasattr(m, "fast"):
            m.fast = False
    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(encoder_module, "fused_attention_available", lambda t: True)
    monkeypatch.setattr(encoder_module.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))
    x = torch.randn(4, 25, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    a, b = fast(x), ref(x_ref)
    assert calls == [1]  # the fused kernel ran, once
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(a)
    a.backward(g), b.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    assert_grads_close(fast, ref)


def test_cosine_attention_equals_normalise_then_attend():
    """The CPU channel attention's form: the norms scale the scores instead of dividing q and
    k; the same values and gradients as F.normalize then softmax(t q k^T) v, a zero row included."""
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(3, 4, 8, 25, generator=gen) for _ in range(3)]
    leaves[0][0, 0, 0] = 0  # a zero row of q: F.normalize's eps applies
    temperature = torch.tensor([0.5, 1.0, 2.0, 4.0]).view(4, 1, 1)
    outs, grads = [], []
    for folded in (True, False):
        q, k, v = (t.clone().requires_grad_() for t in leaves)
        if folded:
            out = cosine_attention(q, k, v, temperature)
        else:
            out = explicit_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, temperature)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        outs.append(out)
        grads.append([t.grad for t in (q, k, v)])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(grads[0][0]).all()


def test_channel_attention_scales_scores_only_under_cpu_bf16(monkeypatch):
    """The CPU channel attention takes cosine_attention under bf16 autocast (close to the
    reference form, within bf16 rounding) and keeps normalising q and k in float32, where it is
    no faster, so float32 numbers stay those of earlier releases."""
    import models.encoder as encoder_module
    calls = []
    monkeypatch.setattr(encoder_module, "cosine_attention",
                        lambda *a: calls.append(a[0].dtype) or cosine_attention(*a))
    torch.manual_seed(0)
    fast = ChannelAttention(32, 4, grid=5)
    ref = copy.deepcopy(fast)
    for m in ref.modules():
        if hasattr(m, "fast"):
            m.fast = False
    x = torch.randn(4, 25, 32)
    fast(x)
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x).float()
    assert calls == [torch.bfloat16]
    expected = ref(x)
    assert F.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.999


def test_conv_qkv_fast_form_is_contiguous_along_tokens():
    qkv = ConvQKV(16, grid=5)
    x = torch.randn(3, 25, 16)
    fast = qkv(x)
    qkv.fast = False
    ref = qkv(x)
    assert fast.is_contiguous() and not ref.is_contiguous()  # the reference keeps oneDNN's strides
    torch.testing.assert_close(fast, ref, rtol=0, atol=0)


def test_fast_pixel_stage_hands_the_stacks_channels_last_maps():
    """The CPU stem's reduce output is channels-last by construction; the fast form passes it on
    without a copy (the stacks then run oneDNN's NHWC convolutions), the reference stays NCHW."""
    enc = make("paper", bands=40)
    x = patches(4, bands=40)
    fast = enc.global_branch.pixel_stage(x)
    ref = copy.deepcopy(enc).set_fast(False).global_branch.pixel_stage(x)
    assert fast.is_contiguous(memory_format=torch.channels_last) and not fast.is_contiguous()
    assert ref.is_contiguous()
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_fast_pixel_stage_batchnorms_read_contiguous_channels_last_slices():
    """Each stack's BatchNorm after the merged 1x1 reduce gets its channel slice as a
    channels-last copy, not a strided view of the merged map (CPU BatchNorm's strided path is
    ~10x slower: bench.micro); the outputs and gradients stay the reference form's."""
    enc = make("paper", bands=40)
    x = patches(4, bands=40).requires_grad_()
    seen = []
    hooks = [stack.reduce[1].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        for stack in enc.global_branch.stacks]
    fast = enc.global_branch.pixel_stage(x)
    for hook in hooks:
        hook.remove()
    assert seen == [True, True]
    (g_fast,) = torch.autograd.grad(fast.square().sum(), x)
    ref_enc = copy.deepcopy(enc).set_fast(False)
    ref = ref_enc.global_branch.pixel_stage(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_stacks_run_channels_last_on_cpu(precision):
    """On CPU the stacks' BatchNorm and max-pool read channels-last maps in float32 (the stem
    Function's layout) and under bf16 autocast (the stem's Conv2d form gives NCHW maps; CPU
    max-pool over NCHW is ~15x slower forward); the reference form stays NCHW."""
    enc = make("paper", bands=40)
    x = patches(4, bands=40)
    seen = []
    for stack in enc.global_branch.stacks:
        for module in (stack.reduce[1], stack.body[1]):  # BatchNorm after the 1x1 reduce, max-pool
            module.register_forward_pre_hook(lambda module, args: seen.append(
                (type(module).__name__, args[0].is_contiguous(memory_format=torch.channels_last))))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        enc.global_branch.tokens(enc.global_branch.pixel_stage(x))
        assert seen == [("BatchNorm2d", True), ("BatchNorm2d", True), ("MaxPool2d", True), ("MaxPool2d", True)]
        seen.clear()
        enc.set_fast(False)
        enc.global_branch.tokens(enc.global_branch.pixel_stage(x))
    assert seen and not any(channels_last for _, channels_last in seen)


def test_autocast_bf16_runs_and_stays_close_to_float32():
    """Mixed precision (bf16 autocast, as pretrain_main uses on CUDA): dtypes stay consistent,
    and the embeddings and gradients are float32's up to bf16 rounding (8 mantissa bits)."""
    enc = make().eval()  # running statistics: both passes normalise alike
    x = patches(8)
    out32 = enc(x)
    (out32["global_z"].sum() + out32["local_z"].sum()).backward()
    grads32 = {k: p.grad.clone() for k, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x)
    (out["global_z"].float().sum() + out["local_z"].float().sum()).backward()
    for key in ("global_z", "local_z"):
        cosine = F.cosine_similarity(out[key].float(), out32[key], dim=1)
        assert cosine.min() > 0.99, (key, cosine.min())
    g16 = torch.cat([p.grad.flatten() for k, p in enc.named_parameters() if k in grads32])
    g32 = torch.cat([g.flatten() for g in grads32.values()])
    assert torch.isfinite(g16).all() and F.cosine_similarity(g16, g32, dim=0) > 0.98


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    enc = make().eval()
    x = patches(4)
    with torch.no_grad():
        cpu = enc(x)
        gpu = copy.deepcopy(enc).to("cuda")(x.to("cuda"))
    for key in cpu:
        assert gpu[key].device.type == "cuda"
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-2, atol=1e-3)


# ---- CPU stem with lean backward, and the per-pixel stage computed once per scene -----------

def test_fast_stem_eval_mode_gradients():
    """Eval-mode BatchNorm (running statistics) with gradients: the fast CPU stem's second branch."""
    fast = make("paper").eval()
    ref = copy.deepcopy(fast).set_fast(False)
    x = patches(4).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    a, b = fast.global_branch.pixel_stage(x), ref.global_branch.pixel_stage(x_ref)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(a)
    a.backward(g), b.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(fast.global_branch.named_parameters(), ref.global_branch.parameters()):
        if q.grad is not None:
            scale = q.grad.abs().max().item() + 1e-8
            assert (p.grad - q.grad).abs().max().item() <= 1e-4 * scale + 1e-7, name


def saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for backward while running fn()."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_fast_stem_keeps_less_for_backward():
    """The CPU stem keeps one tensor per spectral layer (its conv output), autograd's form two or more."""
    fast = make("paper", bands=64)
    ref = copy.deepcopy(fast).set_fast(False)
    x = patches(8, bands=64)
    layer_bytes = 8 * 8 * 32 * 81 * 4  # N x C x B' x P^2 floats of one spectral layer (64 bands -> 32)
    kept_fast = saved_bytes(lambda: fast.global_branch.pixel_stage(x))
    kept_ref = saved_bytes(lambda: ref.global_branch.pixel_stage(x))
    assert kept_ref >= 6 * layer_bytes                 # conv output + ReLU output of each of 3 layers
    # the 3 conv outputs, x, and the 1x1 reduce's outputs and weight (well under one layer here)
    assert kept_fast <= 3 * layer_bytes + x.nbytes + layer_bytes


@pytest.mark.parametrize("preset", ["small", "paper"])
@pytest.mark.parametrize("fast", [True, False])
def test_pixel_map_patches_equal_the_patch_forward(preset, fast):
    from data.patches import PatchCutter
    from models.classifier import extract_features, pixel_cutter
    enc = make(preset).set_fast(fast)
    enc(patches(8))  # a training step's BatchNorm statistics, so eval mode is not the identity
    enc.eval()
    cube = torch.randn(13, 11, BANDS, generator=torch.Generator().manual_seed(3)).numpy()
    cutter = PatchCutter(cube, 9)
    pixels = pixel_cutter(enc, cutter)
    assert pixels.padded.shape == (enc.pixel_channels, 13 + 8, 11 + 8)
    idx = torch.tensor([0, 10, 11, 77, 142])  # corners, an edge, the middle
    with torch.no_grad():
        direct = enc.global_branch.pixel_stage(enc.band_proj(cutter(idx)))
        torch.testing.assert_close(pixels(idx), direct, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(enc.features(cutter(idx), pixels(idx)), enc.features(cutter(idx)),
                                   rtol=1e-4, atol=1e-5)
    flat = idx.numpy()
    np.testing.assert_allclose(extract_features(enc, cutter, flat, 2, pixels=pixels),
                               extract_features(enc, cutter, flat, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("height, width", [(1, 1), (1, 6), (5, 1)])
def test_pixel_stage_of_thin_inputs_equals_the_reference(height, width):
    """The fast CPU stem's row views need channels-last strides, which oneDNN may drop for
    size-1 dims (a 1 x 1 image broke them once): thin inputs give the reference's numbers."""
    enc = make("paper").eval()
    ref = copy.deepcopy(enc).set_fast(False)
    x = torch.randn(3, BANDS, height, width)
    with torch.no_grad():
        torch.testing.assert_close(enc.global_branch.pixel_stage(x), ref.global_branch.pixel_stage(x),
                                   rtol=1e-4, atol=1e-5)
        assert enc.pixel_map(x[0]).shape == (enc.pixel_channels, height, width)


def test_pixel_map_refuses_train_mode():
    enc = make()
    with pytest.raises(RuntimeError, match="eval mode"):
        enc.pixel_map(torch.zeros(BANDS, 9, 9))


def test_low_memory_mode_computes_the_same_and_keeps_less():
    """set_low_memory: same outputs, gradients and BatchNorm statistics as the reference forms."""
    lean = make("paper", bands=64)
    ref = copy.deepcopy(lean).set_fast(False)
    fast = copy.deepcopy(lean)
    lean.set_low_memory(True)
    x = patches(8, bands=64)
    out_l, out_r = lean(x), ref(x)
    for key in out_l:
        torch.testing.assert_close(out_l[key], out_r[key], rtol=1e-4, atol=1e-5)
    w = torch.randn(out_l["global_z"].shape)
    for out in (out_l, out_r):
        ((out["global_z"] * w).sum() + out["local_z"][:, 0].sum()).backward()
    assert_grads_close(lean, ref)
    for (name, a), b in zip(lean.named_buffers(), ref.buffers()):  # each BatchNorm updated once
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    layer_bytes = 8 * 8 * 32 * 81 * 4
    # the stem alone: no spectral conv output kept (x, the reduce's outputs and weight remain)
    stem_lean = saved_bytes(lambda: lean.global_branch.pixel_stage(x))
    stem_fast = saved_bytes(lambda: fast.global_branch.pixel_stage(x))
    assert stem_lean <= stem_fast - 3 * layer_bytes
    # the transformer blocks alone: each keeps only its input (checkpointed)
    tokens = torch.randn(8, 25, lean.config["dim"], requires_grad=True)
    blocks_lean = saved_bytes(lambda: lean.global_branch.forward_blocks(tokens))
    blocks_fast = saved_bytes(lambda: fast.global_branch.forward_blocks(tokens))
    assert blocks_lean <= lean.config["depth"] * tokens.nbytes + tokens.nbytes < blocks_fast / 4


@pytest.mark.parametrize("bands", [5, 6, 7, 12])
def test_spectral_conv_weight_gradient_when_bands_do_not_exceed_the_kernel(bands):
    """PyTorch 2.13's CPU Conv3d gives a wrong weight gradient for k = 7, stride 2 and 5..7
    bands (garbage that varies run to run); spectral_conv3d and the fast stem must not."""
    from models.encoder import spectral_conv3d
    torch.manual_seed(0)
    x = torch.randn(16, 1, bands, 5, 5)
    weight = torch.randn(2, 1, 7, 1, 1)
    exact = weight.double().requires_grad_()
    F.conv3d(x.double(), exact, stride=(2, 1, 1), padding=(3, 0, 0)).square().sum().backward()
    for _ in range(4):
        w = weight.clone().requires_grad_()
        spectral_conv3d(x, w, 2, 3).square().sum().backward()
        torch.testing.assert_close(w.grad.double(), exact.grad, rtol=1e-5, atol=1e-4)
    stem = SpectralStem(bands, 2, [7, 5, 3], [2, 1, 1])  # the encoder's stems, both forms
    for fast in (True, False):
        enc = PCLEncoder(bands, 5, "small", band_proj=0, stem_channels=2).set_fast(fast)
        grads = []
        for _ in range(3):
            enc.zero_grad()
            enc(x[:, 0])["global_z"].sum().backward()
            grads.append(enc.global_branch.stem.layers[0].conv.weight.grad.clone())
        assert all(torch.equal(g, grads[0]) for g in grads) and grads[0].abs().max() < 1e3
    assert stem.out_channels == 2 * ((bands - 1) // 2 + 1)


@pytest.mark.parametrize("height, width", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 3)])
def test_small_map_conv_equals_conv2d(height, width):
    """SmallMapConv2d's matmul form on maps of at most 2 x 2 (3 x 3: the plain conv) gives
    Conv2d's outputs and gradients, for either input memory format."""
    from models.encoder import SmallMapConv2d
    torch.manual_seed(0)
    conv = SmallMapConv2d(6, 5, 3, padding=1, bias=True)
    for channels_last in (False, True):
        x = torch.randn(4, 6, height, width)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        grad_out = torch.randn(4, 5, height, width)
        outs = []
        for fast in (True, False):
            conv.fast = fast
            conv.zero_grad()
            x.grad = None
            if fast and height <= 2 and width <= 2:  # the matmul form must not fall back to the conv
                conv._conv_forward = lambda *a: pytest.fail("SmallMapConv2d used Conv2d on a small map")
            out = conv(x)
            conv.__dict__.pop("_conv_forward", None)
            (out * grad_out).sum().backward()
            outs.append((out.detach(), x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fast_stem_when_its_input_and_a_layer_output_have_the_same_size():
    """8 bands, 2 stem channels, stride 2: the first conv's output (2 x 4 bands) is as big as
    its input (8 bands), the one buffer the fast stem must not reuse as scratch (backward
    reads it for the first layer's weight gradient)."""
    torch.manual_seed(0)
    fast = PCLEncoder(8, 5, "small", band_proj=0, stem_channels=2)
    ref = copy.deepcopy(fast).set_fast(False)
    x = torch.randn(6, 8, 5, 5)
    w = torch.randn(6, fast.config["dim"])
    for enc in (fast, ref):
        out = enc(x)
        ((out["global_z"] * w).sum() + out["local_z"][:, 0].sum()).backward()
    assert fast.global_branch.stem.layers[0].conv.weight.grad.abs().max() > 1e-3
    assert_grads_close(fast, ref)


def test_channels_last_copy_hands_back_an_nchw_gradient():
    """The spectral convs' channels-last input copy returns its gradient in x's own (NCHW)
    layout, so the ReLU and BatchNorm backward before it read one layout; same values."""
    from models.encoder import _ChannelsLastCopy

    g = torch.randn(2, 3, 5, 4).contiguous(memory_format=torch.channels_last)  # as a conv's backward gives
    for copy_fn, nchw in ((_ChannelsLastCopy.apply, True),
                          (lambda t: t.contiguous(memory_format=torch.channels_last), False)):  # autograd's
        x = torch.randn(2, 3, 5, 4, requires_grad=True)
        h = torch.relu(x)                                    # NCHW, as the BatchNorm + ReLU output
        seen = []
        h.register_hook(lambda grad: seen.append(grad))      # the gradient the ReLU backward receives
        y = copy_fn(h)
        assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, h)
        y.backward(g)
        assert torch.equal(seen[0], g) and seen[0].is_contiguous() == nchw


def test_spectral_convs_read_their_input_through_the_nchw_gradient_copy(monkeypatch):
    """The stem's Conv2d form (CPU bf16 autocast, SyncBatchNorm) uses _ChannelsLastCopy for the
    input of every spectral conv after the first (the first reads the 5-D patches by Conv3d)."""
    import models.encoder as encoder_module

    calls, original = [], encoder_module._ChannelsLastCopy

    class Spy(original):
        @staticmethod
        def forward(ctx, x):
            calls.append(x.shape)
            return original.forward(ctx, x)

    monkeypatch.setattr(encoder_module, "_ChannelsLastCopy", Spy)
    stem = SpectralStem(BANDS, 4, [7, 5, 3], [2, 1, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stem(torch.randn(2, BANDS, 5, 5)).float().sum().backward()
    assert len(calls) == 2


def test_sync_batchnorm_encoder_on_cpu_equals_the_reference(monkeypatch):
    """The stem's Conv2d form under autograd with SyncBatchNorm layers, as pretrain_main converts
    them under torchrun on GPUs (in float32 the path CUDA takes through the stem): on CPU without
    a process group SyncBatchNorm falls back to plain batch norm, so it runs here; the reference
    form's values, gradients and running statistics, in train and eval mode, and the same
    parameter names."""
    import models.encoder as encoder_module
    monkeypatch.setattr(encoder_module, "stem_reduce_cpu", None)  # the CPU Function must not run
    plain = make("paper", bands=40)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    ref = copy.deepcopy(plain).set_fast(False)
    assert synced.state_dict().keys() == plain.state_dict().keys()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.global_branch.stem.modules())
    assert_encoder_equals_reference(synced, ref, patches(4, bands=40))
