"""A small model factory behind a name: any torchvision classifier, a new head for N classes.

``build_model`` is also what the TorchServe handler relies on implicitly: the exported
state_dict loads into ``torchvision.models.get_model(arch, num_classes=N)`` with strict=True.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

from jobs.errors import JobError


class ModelError(JobError):
    """An architecture or weights setting the user must fix."""


def head_path(model: nn.Module) -> str:
    """Dotted name of the final Linear layer that maps features to classes."""
    for name in ("fc", "head", "classifier"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Linear):
            return name
        if isinstance(module, nn.Sequential):
            last = [i for i, m in enumerate(module) if isinstance(m, nn.Linear)]
            if last:
                return f"{name}.{last[-1]}"
    raise ModelError(f"cannot find a classifier head in {type(model).__name__}; use a torchvision classifier")


def head_module(model: nn.Module) -> nn.Linear:
    return model.get_submodule(head_path(model))


def _replace_head(model: nn.Module, num_classes: int) -> None:
    path = head_path(model)
    old = model.get_submodule(path)
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Linear(old.in_features, num_classes))


def weights_tag(weights: str) -> str:
    """A stable description of the backbone weights, for cache keys and metadata."""
    if weights in {"imagenet", "none"}:
        return weights
    from jobs.fileio import sha256_file

    if not Path(weights).is_file():
        raise ModelError(f"weights file {weights} not found; use --weights imagenet, none, or a state_dict path")
    return f"file:{sha256_file(weights)[:16]}"


def build_model(arch: str, num_classes: int, weights: str = "imagenet") -> nn.Module:
    """``arch`` from torchvision; ``weights`` = 'imagenet', 'none' or a path to a state_dict.

    A local state_dict may hold the 1000-class ImageNet head (a torchvision download saved
    elsewhere) or already a head for ``num_classes``; the head is replaced either way.
    """
    if arch not in models.list_models(module=models):
        raise ModelError(f"unknown arch '{arch}'; pick a torchvision classifier such as resnet18, resnet50, "
                         "efficientnet_b0, mobilenet_v3_large or convnext_tiny")
    if weights == "imagenet":
        # DEFAULT = the best ImageNet weights torchvision has for this arch; cached in TORCH_HOME.
        model = models.get_model(arch, weights="DEFAULT")
    elif weights == "none":
        model = models.get_model(arch, weights=None)
    else:
        model = models.get_model(arch, weights=None)
        state = _load_local_weights(Path(weights))
        head = head_path(model)
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith(head + ".") for k in missing):
            raise ModelError(f"weights file {weights} does not match arch '{arch}' "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}); pass a {arch} state_dict")
    _replace_head(model, num_classes)
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


def split_backbone_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(feature extractor, head) when the model is exactly ``head(backbone(x))``.

    This holds for the ResNet family (``fc`` after a flatten); for models with dropout or
    extra layers before the head the cached-feature stage is not exact, so we return None and
    training falls back to the full loop.
    """
    if isinstance(model, models.ResNet):
        backbone = nn.Sequential(*(m for name, m in model.named_children() if name != "fc"), nn.Flatten(1))
        return backbone, model.fc
    return None
