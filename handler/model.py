"""Models by name, and the model a server runs, built from ``metadata.json``.

An architecture is a torchvision classifier name (``resnet18``) or ``timm/<name>``
(``timm/tf_efficientnet_lite0``), as in timm's ``create_model``. Training (``jobs.model``) creates its
models here too, so the exported ``state_dict`` loads into exactly what the server builds.

The served model is a ``Classifier``: the backbone (everything up to the pooled features, BatchNorm
folded into the convolutions) and the final linear head, so one forward pass gives both the logits and
the penultimate features the out-of-distribution score needs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torchvision import models

from handler import files, precision, preprocess

logger = logging.getLogger(__name__)

TIMM_PREFIX = "timm/"
INT8_MAX_ACCURACY_LOSS = 0.005  # val accuracy int8 may lose against fp32 (0.5 points) and still be offered


class UnknownArch(ValueError):
    """An architecture name neither torchvision nor timm knows."""


def is_timm(arch: str) -> bool:
    return arch.startswith(TIMM_PREFIX)


def create(arch: str, num_classes: int | None = None, pretrained: bool = False) -> nn.Module:
    """A model by name, randomly initialised (or the library's ImageNet weights when ``pretrained``).

    ``num_classes`` None keeps the library's own head (ImageNet's 1000 classes).
    """
    if is_timm(arch):
        import timm

        name = arch.removeprefix(TIMM_PREFIX)
        if not timm.is_model(name):
            raise UnknownArch(f"unknown arch '{arch}': timm has no model '{name}' (timm.list_models() lists them)")
        return timm.create_model(name, pretrained=pretrained,
                                 **({} if num_classes is None else {"num_classes": num_classes}))
    if arch not in models.list_models(module=models):
        raise UnknownArch(f"unknown arch '{arch}'; pick a torchvision classifier such as resnet18, resnet50, "
                          "efficientnet_b0 or convnext_tiny, or a timm model as timm/<name>")
    model = models.get_model(arch, weights="DEFAULT" if pretrained else None)
    if num_classes is not None:
        replace_head(model, num_classes)
    return model


def preprocess_spec(arch: str) -> dict[str, Any]:
    """The eval preprocessing the architecture's pretrained weights expect (its own data config).

    timm: ``resolve_data_config`` (resize = crop / crop_pct, as timm's own eval transform). torchvision:
    the transforms its DEFAULT weights document (metadata only: nothing is downloaded).
    """
    return copy.deepcopy(_preprocess_spec(arch))


@functools.cache
def _preprocess_spec(arch: str) -> dict[str, Any]:
    if is_timm(arch):
        import math

        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=create(arch, num_classes=0))
        crop = int(cfg["input_size"][-1])
        return preprocess.spec(resize_size=math.floor(crop / cfg["crop_pct"]), crop_size=crop, mean=cfg["mean"],
                               std=cfg["std"], interpolation=cfg["interpolation"])
    weights = models.get_model_weights(arch).DEFAULT.transforms()
    return preprocess.spec(resize_size=weights.resize_size[0], crop_size=weights.crop_size[0], mean=weights.mean,
                           std=weights.std, interpolation=weights.interpolation.value)


def head_path(model: nn.Module) -> str:
    """Dotted name of the final Linear layer that maps features to classes."""
    if hasattr(model, "get_classifier"):  # timm
        head = model.get_classifier()
        for name, module in model.named_modules():
            if module is head and isinstance(module, nn.Linear):
                return name
    for name in ("fc", "head", "classifier"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Linear):
            return name
        if isinstance(module, nn.Sequential):
            last = [i for i, m in enumerate(module) if isinstance(m, nn.Linear)]
            if last:
                return f"{name}.{last[-1]}"
    raise UnknownArch(f"cannot find a linear classifier head in {type(model).__name__}")


def head_module(model: nn.Module) -> nn.Linear:
    return model.get_submodule(head_path(model))


def replace_head(model: nn.Module, num_classes: int) -> None:
    """A new, randomly initialised ``Linear(features, num_classes)`` in place of the head."""
    path = head_path(model)
    model.set_submodule(path, nn.Linear(model.get_submodule(path).in_features, num_classes))


class Classifier(nn.Module):
    """(features, logits) = (backbone(x), head(backbone(x))): the pooled features the head sees, and its logits."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return features, self.head(features)


def split(model: nn.Module) -> Classifier:
    """The model as backbone + head. The head is the model's own module (training it trains the model);
    the backbone is a copy with the head replaced by Identity, so in eval mode it returns exactly the
    head's input (any dropout before the head is off)."""
    path = head_path(model)
    backbone = copy.deepcopy(model)
    backbone.set_submodule(path, nn.Identity())
    return Classifier(backbone, model.get_submodule(path))


class TraceGuard:
    """torch.fx traces a module by patching ``torch.nn.Module.__call__`` for the whole process while it traces:
    a module called meanwhile on another thread -- a forward pass, a torchvision transform decoding a request --
    goes through the tracer and fails ("module is not installed as a submodule"). A process that builds a model
    while it serves (KServe's runtime loading the next version) traces ``alone()``: it waits for the module calls
    running ``shared()`` to end, and new ones wait for the trace (milliseconds; loading the weights and warming up
    happen outside it)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._tracing = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._tracing)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                if not self._running:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._tracing)
            self._tracing = True
            self._cond.wait_for(lambda: not self._running)
        try:
            yield
        finally:
            with self._cond:
                self._tracing = False
                self._cond.notify_all()


FX_TRACE = TraceGuard()


class _ConvBnTracer(fx.Tracer):
    """Convolutions and BatchNorms (and their subclasses: timm's Conv2dSame, BatchNormAct2d) stay whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` with every BatchNorm that directly follows a convolution folded into it.

    The same function up to float rounding (7e-7 on ResNet-18 logits), minus one memory-bound op per
    convolution: 8 % off a served image's forward pass and 10-15 % off frozen feature extraction on the
    CPU (ResNet-18, 2 cores). timm's BatchNormAct2d keeps its activation. Inference only: the copy has no
    BatchNorm statistics to train. A module torch.fx cannot trace is returned unfolded, with a log line.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    module = copy.deepcopy(module).eval()
    try:
        with FX_TRACE.alone():
            graph = _ConvBnTracer().trace(module)
    except Exception as e:  # torch.fx raises many kinds for an untraceable forward
        logger.info("BatchNorm not folded (%s: %s); running %s unfolded", type(e).__name__, e, type(module).__name__)
        return module
    folded = fx.GraphModule(module, graph)
    mods = dict(folded.named_modules())
    for node in list(folded.graph.nodes):
        conv = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(mods.get(node.target), nn.BatchNorm2d) and isinstance(conv, fx.Node)
                and conv.op == "call_module" and type(mods.get(conv.target)) in (nn.Conv2d, _conv2d_same())
                and len(conv.users) == 1):
            continue
        bn, c = mods[node.target], mods[conv.target]
        if bn.running_mean is None:
            continue
        c.weight, c.bias = fuse_conv_bn_weights(c.weight, c.bias, bn.running_mean, bn.running_var, bn.eps,
                                                bn.weight, bn.bias)
        after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
        if after:  # BatchNormAct2d: the activation stays where the norm was
            folded.set_submodule(node.target, nn.Sequential(*after))
        else:
            node.replace_all_uses_with(conv)
            folded.graph.erase_node(node)
    folded.graph.lint()
    folded.delete_all_unused_submodules()
    folded.recompile()
    return folded


def _conv2d_same() -> type:
    """timm's TF-'same'-padding convolution (a Conv2d whose forward pads first), or Conv2d without timm."""
    try:
        from timm.layers import Conv2dSame
    except ImportError:
        return nn.Conv2d
    return Conv2dSame


def load_state(meta: dict, weights: Path | dict[str, torch.Tensor]) -> nn.Module:
    """``meta["arch"]`` with ``meta["num_classes"]`` outputs and ``weights`` (a state_dict or its file), eval mode."""
    model = create(meta["arch"], meta["num_classes"])
    state = weights if isinstance(weights, dict) else torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def build_model(meta: dict, weights: Path | dict[str, torch.Tensor], device: torch.device) -> Classifier:
    """The served model: BatchNorm folded, channels_last, on ``device``, in eval mode."""
    parts = split(load_state(meta, weights))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    served = Classifier(fold_batchnorm(parts.backbone), parts.head).eval()
    return served.to(device, memory_format=torch.channels_last)


# -- int8 ------------------------------------------------------------------------------------------

def _int8_prepared(meta: dict, model: nn.Module) -> nn.Module:
    """FX graph-mode static quantization for x86 (FBGEMM/oneDNN kernels; no compiler needed at start-up)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = "x86"
    with FX_TRACE.alone():
        return prepare_fx(model.eval(), get_default_qconfig_mapping("x86"),
                          (torch.zeros(1, *meta["input_size"]),))


def quantize_int8(meta: dict, model: Classifier, calibration: list[torch.Tensor]) -> nn.Module:
    """An int8 copy of ``model`` (CPU), its activation ranges observed on the ``calibration`` batches."""
    from torch.ao.quantization.quantize_fx import convert_fx

    prepared = _int8_prepared(meta, copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format))
    with torch.inference_mode():
        for x in calibration:
            prepared(x)
    return convert_fx(prepared)


def build_int8_model(meta: dict, weights: Path) -> nn.Module:
    """The int8 model the export wrote (``files.INT8_WEIGHTS``), rebuilt as ``quantize_int8`` built it."""
    from torch.ao.quantization.quantize_fx import convert_fx

    parts = split(create(meta["arch"], meta["num_classes"]).eval())
    model = Classifier(fold_batchnorm(parts.backbone), parts.head).eval()
    with warnings.catch_warnings():  # the observers are empty on purpose: the scales come from the file
        warnings.filterwarnings("ignore", "must run observer", UserWarning)
        quantized = convert_fx(_int8_prepared(meta, model))
    quantized.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return quantized.eval()


def load_serving_model(meta: dict, model_dir: Path, weights: Path, device: torch.device,
                       requested: str = "auto") -> tuple[nn.Module, torch.dtype | None, str]:
    """(model, autocast dtype, precision name) as every runtime and ``jobs predict`` serve it.

    int8 where the export offered it (``serve_precision.choice``), on the CPU, unless fp32/bf16/fp16
    is requested; otherwise ``build_model`` with ``precision.serve_dtype``.
    """
    if (requested == "auto" and device.type == "cpu" and (meta.get("serve_precision") or {}).get("choice") == "int8"
            and (model_dir / files.INT8_WEIGHTS).is_file()):
        return build_int8_model(meta, model_dir / files.INT8_WEIGHTS), None, "int8"
    dtype = precision.serve_dtype(meta, device, requested)
    return build_model(meta, weights, device), dtype, precision.name(dtype)


@torch.inference_mode()
def forward(model: nn.Module, batch: torch.Tensor, device: torch.device, dtype: torch.dtype | None,
            chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of a ``Classifier`` as fp32 on the CPU; one forward pass per ``chunk`` images."""
    if not len(batch):
        return torch.empty(0, 0), torch.empty(0, 0)
    features, logits = [], []
    for part in batch.split(chunk):
        x = part.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with precision.autocast(device, dtype):
            f, z = model(x)
        features.append(f.float().cpu())
        logits.append(z.float().cpu())
    return torch.cat(features), torch.cat(logits)
