"""Patches cut on the device from one padded cube tensor, and the two random views."""
import numpy as np
import torch
import torch.nn.functional as F

from utils.device import host_to_device


class PatchCutter:
    """Holds the reflect-padded cube on a device and cuts (N, B, P, P) batches of patches.

    cube: (H, W, B) float32 standardised. Pixels are addressed by flat index r * W + c.
    """

    def __init__(self, cube, patch_size, device="cpu"):
        if patch_size % 2 != 1:
            raise ValueError("patch_size must be odd")
        height, width, _ = cube.shape
        half = patch_size // 2
        mode = "reflect" if min(height, width) > half else "symmetric"
        padded = np.pad(cube, ((half, half), (half, half), (0, 0)), mode=mode)
        padded = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1))).to(device)  # (B, H+2h, W+2h)
        self._hold(padded, patch_size, height, width)

    @classmethod
    def from_padded(cls, padded, patch_size, height, width):
        """A cutter over an already padded (C, H + P - 1, W + P - 1) tensor (e.g. a pixel map
        of the padded cube), addressed by the same flat indices of the (H, W) scene."""
        cutter = cls.__new__(cls)
        cutter._hold(padded, patch_size, height, width)
        return cutter

    def _hold(self, padded, patch_size, height, width):
        self.patch_size, self.height, self.width = patch_size, height, width
        self.bands = padded.shape[0]
        self.padded = padded
        self.offsets = torch.arange(patch_size, device=padded.device)

    def __call__(self, flat_index):
        """flat_index: (N,) long tensor of pixel indices. Returns (N, B, P, P)."""
        flat_index = flat_index.to(self.padded.device)
        rows = torch.div(flat_index, self.width, rounding_mode="floor")
        cols = flat_index % self.width
        r = rows[:, None] + self.offsets                     # (N, P) rows in padded coordinates
        c = cols[:, None] + self.offsets                     # (N, P)
        patches = self.padded[:, r[:, :, None], c[:, None, :]]  # (B, N, P, P)
        return patches.permute(1, 0, 2, 3).contiguous()


def draw_view_params(n, generator):
    """The random numbers of n views: (N, 6) uniform in [0, 1) on the CPU, from `generator`.

    Drawing them apart from applying them lets every DDP rank draw a global batch's
    numbers and apply its own rows, so the views equal those of one process.
    """
    return torch.rand(n, 6, generator=generator)


def apply_views(x, u, crop_min=0.9, jitter_p=0.8, contrast=0.2, shift=0.1):
    """Views of x for the numbers u of draw_view_params: x (N, B, P, P), u (N, 6) -> (N, B, P, P)."""
    n = x.shape[0]
    u = u.to(x.device, x.dtype)                                          # (N, 6)
    scale = crop_min + (1 - crop_min) * u[:, 0]
    tx = (1 - scale) * (2 * u[:, 1] - 1)
    ty = (1 - scale) * (2 * u[:, 2] - 1)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    view = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    apply = (u[:, 3] < jitter_p).to(x.dtype)[:, None, None, None]
    alpha = 1 + contrast * (2 * u[:, 4] - 1)
    beta = shift * (2 * u[:, 5] - 1)
    jittered = view * alpha[:, None, None, None] + beta[:, None, None, None]
    return apply * jittered + (1 - apply) * view


def random_views(x, generator, crop_min=0.9, jitter_p=0.8, contrast=0.2, shift=0.1):
    """One random view of each patch: crop-and-resize, then brightness/contrast jitter.

    x: (N, B, P, P). Crop side in [crop_min, 1] of the patch at a random position,
    resized back to P x P (bilinear); with probability jitter_p, x * alpha + beta with
    alpha in [1 - contrast, 1 + contrast], beta in [-shift, shift]. Random numbers come
    from `generator` (CPU) so a seed fixes the views on any device. Returns (N, B, P, P).
    """
    u = host_to_device(draw_view_params(x.shape[0], generator), x.device)  # (N, 6), no wait on a GPU
    return apply_views(x, u, crop_min, jitter_p, contrast, shift)
