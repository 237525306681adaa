"""Two saved artefacts (STYLE.md): the release encoder and the resume checkpoint.

- encoder: safetensors, clean keys, the architecture and run config as JSON metadata;
  finetune.py rebuilds the model from that metadata and loads it strictly.
- checkpoint: torch.save of plain tensors and dicts, read back with weights_only=True,
  so a crafted pickle is refused and executes nothing.
Both are written atomically (temporary file, fsync, rename).
"""
import json
import pickle
import re
import subprocess
import warnings
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


def _open_encoder_file(path, tensors=True):
    """(tensors or None, decoded metadata) of an encoder file; UserError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no encoder weights there; run pretrain_main.py first or pass --weights=FILE")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
        weights = load_file(str(path)) if tensors else None
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        with open(path, "rb") as f:
            head = f.read(4)
        kind = ("it is a PyTorch/pickle file, never unpickled here as that could run code"
                if head[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") else _short(err))
        raise UserError(f"{path}: not a readable safetensors encoder file ({kind}); "
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
    return weights, meta


def read_encoder_file(path):
    """Tensors and decoded metadata of an encoder file; UserError if it is not one."""
    return _open_encoder_file(path)


def read_encoder_metadata(path):
    """Decoded metadata of an encoder file, without loading its tensors; UserError if not one."""
    return _open_encoder_file(path, tensors=False)[1]


def load_encoder(path, build_encoder, device="cpu"):
    """Rebuild the encoder from the file's metadata and load its weights strictly.

    build_encoder: callable(config dict) -> nn.Module. Returns (encoder, metadata).
    The architecture is first built on the meta device (no memory) and its tensor
    names and shapes compared with the file's, so crafted metadata can neither crash
    the loader nor make it allocate more than the file itself holds.
    """
    tensors, meta = read_encoder_file(path)
    config = meta.get("encoder_config")
    if not isinstance(config, dict):
        raise UserError(f"{path}: encoder metadata has no architecture (encoder_config {config!r:.80}); "
                        "encoders are shared as .safetensors written by pretrain_main.py")
    try:
        with torch.device("meta"):
            skeleton = build_encoder(config)
    except UserError as err:
        raise UserError(f"{path}: bad architecture in its metadata: {err}") from None
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as err:
        raise UserError(f"{path}: bad architecture in its metadata ({_short(err)})") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        reshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        example = (f"e.g. {reshaped[0]} is {found[reshaped[0]]} in the file, {expected[reshaped[0]]} in the model"
                   if reshaped else f"e.g. {(missing + unexpected)[0]}")
        raise UserError(f"{path}: weights do not fit the architecture in its metadata ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(reshaped)} of another shape; {example})")
    encoder = build_encoder(config)
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
    """Load a resume checkpoint with weights_only=True; a pickle with code is refused.

    Anything that is not such a checkpoint (crafted pickle, truncated, empty, another
    format) raises UserError naming the file; nothing in it is ever executed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint there")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": one line on stderr only
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path}: refused: it holds pickled objects other than tensors, numbers, strings, "
                        f"lists and dicts, which could run code; it was not loaded ({_short(err, 120)})") from None
    except Exception as err:  # zip, pickle and storage errors of many types all mean "unreadable"
        raise UserError(f"{path}: unreadable checkpoint ({_short(err)}); it may be truncated or not a "
                        "checkpoint of pretrain_main.py: delete it or pass --resume=false") from None


def _short(err, limit=200):
    """First line of an exception's message, without terminal escapes, at most `limit` characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:limit]}" if text else type(err).__name__
