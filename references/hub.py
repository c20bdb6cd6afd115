"""torchvision's ImageNet weight files and the folder torch.hub keeps them in, without
importing torch: the post-processor looks there for AlexNet's file to draw its conv1 filters
(``dashboards.pareto``); ``references.pretrained`` resolves the trials' weights with it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["TORCHVISION_WEIGHT_FILES", "hub_checkpoints_dir"]

#: torchvision's ImageNet weight files (IMAGENET1K_V1), as torch.hub names them.
TORCHVISION_WEIGHT_FILES: dict[str, str] = {
    "alexnet": "alexnet-owt-7be5be79.pth",
    "resnet18": "resnet18-f37072fd.pth",
}


def hub_checkpoints_dir() -> Path:
    """Where torch.hub keeps weight files: ``torch.hub.get_dir()/checkpoints``.

    In a process that has imported torch this is torch's own answer (a ``torch.hub.set_dir``
    included); otherwise torch's rule, applied here so that asking costs no torch import:
    ``$TORCH_HOME/hub``, TORCH_HOME defaulting to ``$XDG_CACHE_HOME/torch`` and
    XDG_CACHE_HOME to ``~/.cache``."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "hub"):
        return Path(torch.hub.get_dir()) / "checkpoints"
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"
