"""Two saved artefacts (STYLE.md): the release encoder and the resume checkpoint.

- encoder: safetensors, clean keys, the architecture and run config as JSON metadata;
  finetune.py rebuilds the model from that metadata and loads it strictly.
- checkpoint: torch.save of plain tensors and dicts, read back with weights_only=True,
  so a crafted pickle is refused and executes nothing.
Both are written atomically (temporary file, fsync, rename).
"""
import json
import pickle
import subprocess
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from utils.errors import UserError
from utils.fileio import atomic_path

ENCODER_FORMAT = "pcl-encoder-v1"


def git_commit():
    """The current git commit of the project, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_encoder(path, encoder, metadata):
    """Save encoder weights (safetensors) with `encoder.config` and `metadata` as JSON strings."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    meta = {"format": ENCODER_FORMAT, "encoder_config": json.dumps(encoder.config)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_encoder_file(path):
    """Tensors and decoded metadata of an encoder file; UserError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no encoder weights there; run pretrain_main.py first or pass --weights=FILE")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: not a readable safetensors encoder file ({_short(err)}); "
                        "encoders are shared as .safetensors written by pretrain_main.py") from None
    if raw_meta.get("format") != ENCODER_FORMAT:
        raise UserError(f"{path}: safetensors file without this project's encoder metadata "
                        f"(format {raw_meta.get('format')!r}, expected {ENCODER_FORMAT!r})")
    meta = {}
    for key, value in raw_meta.items():
        try:
            meta[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            meta[key] = value
    return tensors, meta


def load_encoder(path, build_encoder, device="cpu"):
    """Rebuild the encoder from the file's metadata and load its weights strictly.

    build_encoder: callable(config dict) -> nn.Module. Returns (encoder, metadata).
    """
    tensors, meta = read_encoder_file(path)
    encoder = build_encoder(meta["encoder_config"])
    try:
        encoder.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit the architecture in its metadata ({_short(err)})") from None
    return encoder.to(device), meta


def save_checkpoint(path, state):
    """Save a resume checkpoint (plain tensors, numbers, strings, dicts and lists only)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path):
    """Load a resume checkpoint with weights_only=True; a pickle with code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        raise UserError(f"{path}: refused or unreadable checkpoint ({_short(err)}); "
                        "only plain tensors and dicts are accepted (weights_only=True)") from None


def _short(err):
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
