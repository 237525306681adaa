"""Classifiers on top of the encoder: the frozen linear probe and the authors' fine-tuning recipe."""
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from data.patches import PatchCutter
from utils.device import fused_adam, host_to_device


@torch.no_grad()
def pixel_cutter(encoder, cutter):
    """A PatchCutter over encoder.pixel_map of the cutter's padded cube (eval mode).

    Its patches are what the encoder's per-pixel stage gives on the cutter's patches, so
    `encoder.features(cutter(i), pixels(i))` equals `encoder.features(cutter(i))` at a
    fraction of the cost; valid while the encoder's weights and BatchNorm stats do not change.
    """
    encoder.eval()
    pixel_map = encoder.pixel_map(cutter.padded)                       # (R, H + P - 1, W + P - 1)
    return PatchCutter.from_padded(pixel_map, cutter.patch_size, cutter.height, cutter.width)


@torch.no_grad()
def extract_features(encoder, cutter, flat_index, batch_size=512, pixels=None):
    """Frozen features of the given pixels, in batches (bounded memory).

    flat_index: (M,) int64 numpy; pixels: optional pixel_cutter(encoder, cutter), to skip
    the per-pixel stage. Returns (M, F) float32 numpy, F = global dim + local width.
    """
    encoder.eval()
    device = cutter.padded.device
    out = []
    for start in range(0, len(flat_index), batch_size):
        idx = torch.from_numpy(np.asarray(flat_index[start:start + batch_size])).to(device)
        pixel = None if pixels is None else pixels(idx)
        out.append(encoder.features(cutter(idx), pixel).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, sum(encoder.feature_dims)), np.float32)


def fit_linear_probe(features, labels, seed=0, c=1.0):
    """Multinomial logistic regression on standardised frozen features.

    features: (M, F); labels: (M,) in 1..K. Returns a callable (M', F) -> (M',) predictions.
    """
    scaler = StandardScaler().fit(features)
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    model.fit(scaler.transform(features), labels)
    return lambda x: model.predict(scaler.transform(x))


class TwoHeadClassifier(nn.Module):
    """Encoder plus one linear head per branch; logits 0.8 x global + 0.2 x local (METHOD.md)."""

    def __init__(self, encoder, n_classes, global_share=0.8):
        super().__init__()
        self.encoder = encoder
        dim_global, dim_local = encoder.feature_dims
        self.head_global = nn.Linear(dim_global, n_classes)
        self.head_local = nn.Linear(dim_local, n_classes)
        self.global_share = global_share

    def forward(self, x, pixel=None):
        """x: (N, B, P, P) -> (global logits (N, K), local logits (N, K)); pixel: see PCLEncoder."""
        out = self.encoder(x, pixel)
        return self.head_global(out["global_feat"]), self.head_local(out["local_feat"])

    def predict_logits(self, x, pixel=None):
        g, l = self(x, pixel)
        return self.global_share * g + (1 - self.global_share) * l


def train_classifier(model, cutter, train_index, train_labels, epochs=100, batch_size=64, lr=1e-3,
                     backbone_lr_scale=0.01, weight_decay=0.0, seed=0, augment=None, on_step=None,
                     fused=None, autocast=nullcontext):
    """Fine-tune encoder and heads with class-weighted cross-entropy on both branches.

    train_index: (M,) flat pixel indices; train_labels: (M,) in 1..K. Heads at `lr`, the encoder
    at lr * backbone_lr_scale (1.0 trains it from scratch: the supervised baseline).
    on_step: optional callable, called with no arguments after each optimiser step (the
    benchmark times steps with it). fused: torch's fused Adam (None: where it runs, see
    utils.device.fused_adam; the benchmark's reference form passes False, torch's default).
    autocast: no-argument callable giving the forward pass's context (utils.device.autocast_for);
    the losses are float32 either way.
    """
    device = cutter.padded.device
    labels = torch.as_tensor(np.asarray(train_labels) - 1, device=device)
    counts = torch.bincount(labels, minlength=model.head_global.out_features).float()
    class_weight = (counts.sum() / counts.clamp(min=1) / len(counts)).to(device)
    optimizer = torch.optim.Adam([
        {"params": model.encoder.parameters(), "lr": lr * backbone_lr_scale},
        {"params": list(model.head_global.parameters()) + list(model.head_local.parameters()), "lr": lr},
    ], weight_decay=weight_decay, fused=fused_adam(device) if fused is None else fused)  # fused: one kernel
    index = torch.as_tensor(np.asarray(train_index), device=device)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = host_to_device(torch.randperm(len(index), generator=gen), device)
        for start in range(0, len(index), batch_size):
            batch = order[start:start + batch_size]
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            x = cutter(index[batch])
            if augment is not None:
                x = augment(x, gen)
            with autocast():
                g, l = model(x)
            g, l, y = g.float(), l.float(), labels[batch]
            loss = F.cross_entropy(g, y, weight=class_weight) + F.cross_entropy(l, y, weight=class_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step()
    model.eval()
    return model


@torch.no_grad()
def predict_pixels(model, cutter, flat_index, batch_size=512, pixels=None):
    """Class predictions 1..K of a TwoHeadClassifier for the given pixels, batched: (M,) int64.

    pixels: optional pixel_cutter(model.encoder, cutter) of the trained model.
    """
    model.eval()
    device = cutter.padded.device
    out = []
    for start in range(0, len(flat_index), batch_size):
        idx = torch.from_numpy(np.asarray(flat_index[start:start + batch_size])).to(device)
        pixel = None if pixels is None else pixels(idx)
        out.append(model.predict_logits(cutter(idx), pixel).argmax(1).cpu())
    return (torch.cat(out).numpy() + 1).astype(np.int64)
