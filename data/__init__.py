"""Hyperspectral scenes: the scene table, file reading/downloading, and checks.

`load_scene(name, data_dir)` returns a `Scene` with cube (H, W, B) float32 and
gt (H, W) int64 (0 = unlabelled, 1..K).
"""
from data.loading import check_data_dir, check_scene_args, load_scene, resolve_data_dir, scene_name
from data.scenes import SCENES

__all__ = ["check_data_dir", "check_scene_args", "load_scene", "resolve_data_dir", "scene_name", "SCENES"]
