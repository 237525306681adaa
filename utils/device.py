"""The one place that turns `--device=auto|cpu|cuda[:i]` into a torch.device."""
import torch

from utils.errors import UserError


def pick_device(name):
    """'auto' -> CUDA when present, else CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name}: CUDA is not available on this machine; use --device=auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name}: expected auto, cpu or cuda[:index]") from None
