"""The model training starts from: an architecture by name with a new head, and its starting weights.

Architectures are created by ``handler.model.create`` (torchvision names, or ``timm/<name>``), the
function the server builds its model with, so the exported ``state_dict`` loads there with strict=True.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from handler import model as models
from handler.model import head_module, head_path
from jobs.errors import JobError

__all__ = ["ModelError", "build_model", "freeze_backbone", "head_module", "head_path", "split_backbone_head",
           "weights_tag"]


class ModelError(JobError):
    """An architecture or weights setting the user must fix."""


def weights_tag(weights: str) -> str:
    """A stable description of the backbone weights, for cache keys and metadata."""
    if weights in {"imagenet", "none"}:
        return weights
    from jobs.fileio import sha256_file

    if not Path(weights).is_file():
        raise ModelError(f"weights file {weights} not found; use --weights imagenet, none, or a state_dict path")
    return f"file:{sha256_file(weights)[:16]}"


def build_model(arch: str, num_classes: int, weights: str = "imagenet") -> nn.Module:
    """``arch`` (torchvision, or ``timm/<name>``) with a new head for ``num_classes``.

    ``weights``: 'imagenet' (the library's pretrained weights: torchvision's DEFAULT, timm's default
    pretrained tag, downloaded once into their caches), 'none' (random), or a path to a state_dict. A local
    state_dict may hold the 1000-class ImageNet head or already a head for ``num_classes``; the head is
    replaced either way.
    """
    try:
        if weights == "imagenet":
            model = models.create(arch, pretrained=True)
        else:
            model = models.create(arch)
    except models.UnknownArch as e:
        raise ModelError(str(e)) from None
    if weights not in {"imagenet", "none"}:
        state = _load_local_weights(Path(weights))
        head = head_path(model)
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith(head + ".") for k in missing):
            raise ModelError(f"weights file {weights} does not match arch '{arch}' "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}); pass a {arch} state_dict")
    models.replace_head(model, num_classes)
    return model


def _load_local_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"weights file {path} not found; use --weights imagenet, none, or a state_dict path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise ModelError(f"weights file {path} is not a loadable state_dict ({type(e).__name__}); "
                         "save one with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # one of our own checkpoints
    if not isinstance(state, dict):
        raise ModelError(f"weights file {path} holds a {type(state).__name__}, not a state_dict")
    return state


def freeze_backbone(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the head; return the head's (trainable) parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    head = head_module(model)
    for p in head.parameters():
        p.requires_grad_(True)
    return list(head.parameters())


def split_backbone_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(feature extractor, head): the frozen backbone's pooled features, and the model's own head module.

    In eval mode ``head(backbone(x))`` is the model's output exactly, so the head stage can train on
    cached features. The backbone is a copy; the head is shared, so training it trains ``model``. A
    dropout right before the head (torchvision's EfficientNet, MobileNet) is not applied to cached
    features; the augmented views regularise the head instead.
    """
    parts = models.split(model)
    return parts.backbone, parts.head
