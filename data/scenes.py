"""The benchmark scenes: files, keys, class names, label values, display bands.

One table, `SCENES`, is the only place these facts live. Sizes and SHA-256 values
come from /work/shared/data/README.md and SMALL_SCENES.md (GIC, UPV/EHU files).
"""
import colorsys
from dataclasses import dataclass

import numpy as np

_GIC = "http://www.ehu.eus/ccwintco/uploads/"


@dataclass(frozen=True)
class SceneFile:
    """One file of a scene: its name in the data folder, the array key, and where to get it.

    url is "" when the file has no public download address.
    """
    name: str
    key: str
    url: str
    size: int
    sha256: str


@dataclass(frozen=True)
class SceneInfo:
    """Everything fixed about a scene.

    shape: (H, W, B) of the cube as stored (rows, cols, bands).
    label_values: the raw gt values of the K classes, in class order; they are
    remapped to 1..K on load (0 stays background).
    rgb_bands: 0-based band indices shown as (R, G, B) in false-colour images.
    crop_of, crop: for a crop of another scene, that scene's name and the
    (row0, row1, col0, col1) window (end exclusive) used when the crop's own
    file is absent.
    """
    name: str
    cube: SceneFile
    gt: SceneFile
    shape: tuple
    class_names: tuple
    label_values: tuple
    rgb_bands: tuple
    crop_of: str = ""
    crop: tuple = ()

    @property
    def n_classes(self):
        return len(self.class_names)


_INDIAN_NAMES = (
    "Alfalfa", "Corn-notill", "Corn-mintill", "Corn", "Grass-pasture", "Grass-trees",
    "Grass-pasture-mowed", "Hay-windrowed", "Oats", "Soybean-notill", "Soybean-mintill",
    "Soybean-clean", "Wheat", "Woods", "Buildings-Grass-Trees-Drives", "Stone-Steel-Towers")
_SALINAS_NAMES = (
    "Brocoli_green_weeds_1", "Brocoli_green_weeds_2", "Fallow", "Fallow_rough_plow",
    "Fallow_smooth", "Stubble", "Celery", "Grapes_untrained", "Soil_vinyard_develop",
    "Corn_senesced_green_weeds", "Lettuce_romaine_4wk", "Lettuce_romaine_5wk",
    "Lettuce_romaine_6wk", "Lettuce_romaine_7wk", "Vinyard_untrained", "Vinyard_vertical_trellis")
_PAVIA_NAMES = (
    "Asphalt", "Meadows", "Gravel", "Trees", "Painted metal sheets", "Bare Soil", "Bitumen",
    "Self-Blocking Bricks", "Shadows")

# AVIRIS bands ~(830, 650, 550) nm: near-infrared as red makes vegetation stand out.
# The corrected cubes drop bands only above index 103, so these indices are unchanged.
_AVIRIS_RGB = (43, 21, 11)
_SALINAS_A_VALUES = (1, 10, 11, 12, 13, 14)
_SUBSET_VALUES = (2, 6, 10, 11)

SCENES = {
    "IndianPines": SceneInfo(
        name="IndianPines",
        cube=SceneFile("Indian_pines_corrected.mat", "indian_pines_corrected",
                       _GIC + "6/67/Indian_pines_corrected.mat", 5953527,
                       "ec2f8808710919d566f70f0d4aa885aae1ddfd42b734aba71c5e12ca65450939"),
        gt=SceneFile("Indian_pines_gt.mat", "indian_pines_gt", _GIC + "c/c4/Indian_pines_gt.mat", 1125,
                     "65c4687a8ab04f6da4789799bc3bc4f6e88bccac3ed6a2e6ae367e5e6b9e429c"),
        shape=(145, 145, 200), class_names=_INDIAN_NAMES, label_values=tuple(range(1, 17)),
        rgb_bands=_AVIRIS_RGB),
    "PaviaU": SceneInfo(
        name="PaviaU",
        cube=SceneFile("PaviaU.mat", "paviaU", _GIC + "e/ee/PaviaU.mat", 34806917,
                       "28447fa87f7a5797845e9a189c0da85e23b1d06a4ba7361e5ff44efbf834d2fb"),
        gt=SceneFile("PaviaU_gt.mat", "paviaU_gt", _GIC + "5/50/PaviaU_gt.mat", 11005,
                     "23f6a426928f9b32984adffe659e29f554f9fb6c93b5a107528d308d5087a829"),
        # ROSIS 430-860 nm: bands ~(650, 590, 480) nm for a near-true-colour view.
        shape=(610, 340, 103), class_names=_PAVIA_NAMES, label_values=tuple(range(1, 10)),
        rgb_bands=(55, 41, 12)),
    "Salinas": SceneInfo(
        name="Salinas",
        cube=SceneFile("Salinas_corrected.mat", "salinas_corrected", _GIC + "a/a3/Salinas_corrected.mat",
                       26552770, "5ec1c0d22f56d18ecd336f8e35735863c0f160682e04e0c18ef3f89a3334d87d"),
        gt=SceneFile("Salinas_gt.mat", "salinas_gt", _GIC + "f/fa/Salinas_gt.mat", 4277,
                     "ecfab4d31ef5553f097943235d8ea502038eb4a2067b2ad10b33e37c949955e2"),
        shape=(512, 217, 204), class_names=_SALINAS_NAMES, label_values=tuple(range(1, 17)),
        rgb_bands=_AVIRIS_RGB),
    "SalinasA": SceneInfo(
        name="SalinasA",
        cube=SceneFile("SalinasA_corrected.mat", "salinasA_corrected", _GIC + "1/1a/SalinasA_corrected.mat",
                       1539086, "d75684ed3ab71a1024cee0f9db9061f50a3523a92ff5edfbbb1eed976b9f1721"),
        gt=SceneFile("SalinasA_gt.mat", "salinasA_gt", _GIC + "a/aa/SalinasA_gt.mat", 587,
                     "17814c1d3296c0e29b27f320f2c4174d2a68adb87e376abe78f02923e2c2e454"),
        # The gt keeps full-Salinas class indices; they are remapped to 1..6 on load.
        shape=(83, 86, 204), class_names=tuple(_SALINAS_NAMES[v - 1] for v in _SALINAS_A_VALUES),
        label_values=_SALINAS_A_VALUES, rgb_bands=_AVIRIS_RGB),
    "IndianPinesSubset": SceneInfo(
        name="IndianPinesSubset",
        # Cube and gt live in one file with no public URL; without it the crop is cut
        # from the full Indian Pines scene (same window as the published file).
        cube=SceneFile("Indian_subset.mat", "Indian_subset", "", 1365163,
                       "de9887fc4e91a776fcf4398f0699ad2dedd2f2f9b510266d21c812c3802721c7"),
        gt=SceneFile("Indian_subset.mat", "gt", "", 1365163,
                     "de9887fc4e91a776fcf4398f0699ad2dedd2f2f9b510266d21c812c3802721c7"),
        shape=(70, 70, 200), class_names=tuple(_INDIAN_NAMES[v - 1] for v in _SUBSET_VALUES),
        label_values=_SUBSET_VALUES, rgb_bands=_AVIRIS_RGB,
        crop_of="IndianPines", crop=(30, 100, 25, 95)),
}

# 20 well-separated colours (Trubetskoy's list without white and black);
# black is reserved for the background.
_COLOURS = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128))


def palette(n_classes):
    """Fixed class colours.

    Returns (K+1, 3) uint8: row 0 black (background), rows 1..K the classes.
    Beyond 20 classes the hues follow the golden ratio, still deterministic.
    """
    rows = [(0, 0, 0)] + list(_COLOURS[:n_classes])
    for i in range(len(_COLOURS), n_classes):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.3 * (i % 2), 0.95)
        rows.append((round(r * 255), round(g * 255), round(b * 255)))
    return np.array(rows, dtype=np.uint8).reshape(-1, 3)
