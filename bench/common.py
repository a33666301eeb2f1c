"""Shared by the benchmarks and the parity test: data layout, local backbones, result files.

ImageNet weights cannot be downloaded on the machines this project is built on. Two stand-ins:

- ``calibrated_random_backbone`` (the benchmarks' default): seeded random weights whose BatchNorm
  running statistics were measured on the training images (one no-grad pass). Calibration is what
  makes it fair to the original method, which runs the backbone in train mode: a pretrained net's
  BN statistics match its weights, so that changes little. Its features are weak (~60-65% on
  hymenoptera), which is enough for timing, not for fine accuracy comparisons.
- ``bn_backbone`` (the parity test's): seeded random convolutions + BatchNorm layers trained alone
  (``train_batchnorm_only``, stored in ~100 KB): ~75% on hymenoptera val.

Pass ``--weights PATH`` to the benchmarks to use a real state_dict instead.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from handler.model import preprocess_spec
from handler.preprocess import Preprocessor
from jobs.config import RunPaths
from jobs.fileio import atomic_torch_save, atomic_write_json, link_or_copy, read_json
from jobs.split import splits_document

REPO = Path(__file__).resolve().parents[1]

# the real photo sets of ../shared/datasets (its README says where they come from)
HYMENOPTERA = REPO.parent / "shared" / "datasets" / "hymenoptera"
PETS = REPO.parent / "shared" / "datasets" / "pets-sample"
SCENES = REPO.parent / "shared" / "datasets" / "scenes-sample"
RESULTS = REPO / "bench" / "results"


def seeded_resnet18(seed: int) -> nn.Module:
    """The same random weights on every machine (torch's CPU generator is platform independent)."""
    torch.manual_seed(seed)
    return models.resnet18()


def _batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def calibrated_random_backbone(images: list[Path], out: Path, seed: int = 0, batch_size: int = 32) -> Path:
    """Seeded random ResNet-18 with BN running stats averaged over ``images`` (eval transform)."""
    model = seeded_resnet18(seed)
    for _, m in _batchnorms(model):
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch, not an exponential one
    model.train()
    preprocess = Preprocessor(preprocess_spec("resnet18"))
    for i in range(0, len(images), batch_size):
        model(torch.stack([preprocess(p.read_bytes()) for p in images[i:i + batch_size]]))
    return atomic_torch_save(out, model.state_dict())


def link_split_folders(source: Path, dest: Path, limit: int | None = None) -> Path:
    """``source/{train,val}/<class>/f`` -> ``dest/<class>/<split>/f`` hard links (copies across file systems):
    one folder for `jobs clean`, which does not read symbolic links that lead outside its --data."""
    for split_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            target = dest / class_dir.name / split_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for f in sorted(class_dir.iterdir())[:limit]:
                link_or_copy(f.resolve(), target / f.name)
    return dest


def splits_from_folders(paths: RunPaths, test_every: int = 0) -> dict:
    """splits.json that keeps the source folders' train/val assignment (cleaned files only).

    With ``test_every`` = k, every k-th file of a class's val folder becomes a test file instead.
    """
    report = read_json(paths.clean_report)
    files, seen = {}, {}
    for f in sorted(report["files"], key=lambda f: f["source"]):
        if f["status"] == "excluded":
            continue
        label, folder = Path(f["source"]).parts[:2]
        seen[label, folder] = seen.get((label, folder), 0) + 1
        to_test = folder == "val" and test_every and seen[label, folder] % test_every == 0
        files[f["output"]] = "test" if to_test else folder
    doc = splits_document(files, sorted(report["classes"]), report["data_hash"])
    atomic_write_json(paths.splits, doc)
    return doc


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "cpu": _cpu_name(), "cpu_flags": _cpu_flags(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_flags() -> list[str]:
    """The flags that decide CPU speed here: bf16/AMX (precision: auto) and the vector width."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(flags & {"amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx512_vnni", "avx2"})


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def resolve_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def save_result(name: str, device: str, result: dict) -> Path:
    path = RESULTS / f"{name}-{'cuda' if device.startswith('cuda') else 'cpu'}.json"
    atomic_write_json(path, {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "machine": machine(device), **result})
    print(f"saved {path.relative_to(REPO)}")
    return path


def bn_backbone(bn_file: Path, out: Path) -> Path:
    """A full resnet18 state_dict: seeded random convolutions + the BatchNorm layers stored in ``bn_file``."""
    saved = torch.load(bn_file, map_location="cpu", weights_only=True)
    model = seeded_resnet18(saved["seed"])
    missing, unexpected = model.load_state_dict(saved["batchnorm"], strict=False)
    bn_names = {n for n, _ in _batchnorms(model)}
    if unexpected or any(k.rpartition(".")[0] in bn_names for k in missing):
        raise ValueError(f"{bn_file} is not a resnet18 BatchNorm file from train_batchnorm_only")
    return atomic_torch_save(out, model.state_dict())


def train_batchnorm_only(items: list[tuple[Path, int]], out: Path, seed: int = 0, epochs: int = 80,
                         device: str = "cuda") -> Path:
    """Train only the BatchNorm affine parameters (and a throw-away fc) of a seeded random ResNet-18.

    Frankle et al. (2021): BN-only training of random convolutions learns useful features. The
    result is tiny to store (the BN layers: ~80 KB) yet a real, fixed backbone for tests.
    """
    from torch.utils.data import DataLoader

    from jobs.data import ImageFiles

    model = seeded_resnet18(seed)
    model.fc = nn.Linear(model.fc.in_features, 1 + max(label for _, label in items))
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [p for _, m in _batchnorms(model) for p in m.parameters()] + list(model.fc.parameters())
    for p in trained:
        p.requires_grad_(True)
    model.to(device, memory_format=torch.channels_last)
    loader = DataLoader(ImageFiles(Path("/"), [(str(p.resolve()), y) for p, y in items],
                                   Preprocessor(preprocess_spec("resnet18"), augment=True)),
                        batch_size=32, shuffle=True, num_workers=min(12, os.cpu_count() or 1), drop_last=True,
                        persistent_workers=True)
    optimizer = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-2, total_steps=epochs * len(loader))
    for epoch in range(epochs):
        correct = seen = 0
        model.train()
        for x, y in loader:
            x, y = x.to(device, memory_format=torch.channels_last), y.to(device)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"bn-only epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} train acc {correct / seen:.3f}",
                  flush=True)
    model.cpu()
    state = model.state_dict()
    bn_names = {n for n, _ in _batchnorms(model)}
    return atomic_torch_save(out, {"seed": seed, "conv_fingerprint": conv_fingerprint(seed),
                                   "batchnorm": {k: v for k, v in state.items() if k.rpartition(".")[0] in bn_names}})


def conv_fingerprint(seed: int) -> float:
    """Sum of |conv weights| of ``seeded_resnet18(seed)``: equal here and there, or the BN file is useless."""
    with torch.no_grad():
        return sum(float(p.double().abs().sum()) for n, p in seeded_resnet18(seed).named_parameters()
                   if "conv" in n or "downsample.0" in n)
