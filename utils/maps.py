"""Classification maps as PNG: prediction beside ground truth, fixed palette, legend."""
import numpy as np

from utils.fileio import atomic_path


def colourise(label_map, palette):
    """label_map: (H, W) int 0..K; palette: (K+1, 3) uint8. Returns (H, W, 3) uint8."""
    return palette[label_map]


def save_map_png(path, label_map, palette):
    """The bare map, one pixel per scene pixel, only palette colours (H x W PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        plt.imsave(tmp, colourise(label_map, palette), format="png")


def save_comparison_png(path, prediction, gt, palette, class_names, title=""):
    """Prediction and ground truth side by side with a legend of class names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.5))
    for ax, image, name in zip(axes, (prediction, gt), ("prediction", "ground truth")):
        ax.imshow(colourise(image, palette), interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    handles = [Patch(color=palette[i + 1] / 255.0, label=n) for i, n in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
