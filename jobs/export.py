"""Export: the best weights as a bare state_dict, plus the contract the server reads.

``model/metadata.json`` is the only place the handler learns the architecture, the label
order and the preprocessing; it is written from the same constants the training job used.
Whole pickled modules are never written: they tie the file to this code's class layout and
execute arbitrary code on load. ``torch.load(..., weights_only=True)`` reads what we write.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import torch
import torchvision

from handler import files
from handler.model import is_timm, preprocess_spec
from jobs import __version__, checkpoints
from jobs.backends import backends_record
from jobs.calibrate import fit_trust
from jobs.config import AUTO_VERSION, Config, RunPaths
from jobs.data import load_splits
from jobs.errors import JobError
from jobs.fileio import atomic_torch_save, atomic_write_json, read_json, read_run_file, sweep_partials
from jobs.model import build_model
from jobs.parity import precision_record
from jobs.versions import FIRST_VERSION, TEST_SPLIT_FILE, begin_export, test_split_record, weights_digest


def _license_summary(paths: RunPaths) -> dict | None:
    attribution = paths.raw / "attribution.json"
    if not attribution.exists():
        return None
    counts: dict[str, int] = {}
    for item in read_json(attribution):
        counts[item.get("license") or "unknown"] = counts.get(item.get("license") or "unknown", 0) + 1
    return {"attribution_file": str(attribution), "licenses": counts}


def build_metadata(cfg: Config, splits: dict, metrics: dict) -> dict:
    """``cfg.model_version`` is the version to write (``auto`` becomes the first one: ``versions.begin_export``
    picks the next for a run that has a model already)."""
    spec = preprocess_spec(cfg.arch)
    return {
        "format_version": 1,
        "model_name": cfg.model_name,
        "model_version": FIRST_VERSION if cfg.model_version == AUTO_VERSION else cfg.model_version,
        "arch": cfg.arch,
        "num_classes": len(splits["classes"]),
        "classes": splits["classes"],
        "input_size": [3, spec["crop_size"], spec["crop_size"]],
        "preprocess": spec,
        "topk": cfg.topk,
        "weights": cfg.weights if cfg.weights in {"imagenet", "none"} else "file",
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        **({"timm_version": _timm_version()} if is_timm(cfg.arch) else {}),
        "jobs_version": __version__,
        "data_hash": splits["data_hash"],
        "split_hash": splits["split_hash"],
        "best_epoch": metrics.get("best"),
        "best_epoch_rule": metrics.get("selection"),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _timm_version() -> str:
    import timm

    return timm.__version__


def export(cfg: Config, paths: RunPaths) -> Path:
    """Write ``model/{model.pt,index_to_name.json,metadata.json}``, the trust fields' score file and ``model.onnx``
    (where the architecture exports); returns the model folder.

    The architecture, weights and label order come from the checkpoint, never from this command's
    options: ``cfg`` only names and versions the model.
    """
    sweep_partials(paths.model)
    path, checkpoint = checkpoints.for_inference(paths)
    splits = load_splits(paths)
    if checkpoint["classes"] != splits["classes"]:
        raise JobError(f"checkpoint {path} was trained on classes {checkpoint['classes']}, but {paths.splits} has "
                       f"{splits['classes']}; re-run `python -m jobs train --out {paths.out}`")
    metrics = read_run_file(paths.metrics, f"re-run `python -m jobs evaluate --out {paths.out}`") \
        if paths.metrics.exists() else {}
    state = {k: v.contiguous() for k, v in checkpoint["model"].items()}
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise JobError(f"checkpoint {path} holds non-finite weights ({broken[0]}, ...); nothing exported. Re-train "
                       f"with a lower --lr: `python -m jobs train --out {paths.out} --fresh --lr ...`")
    # Prove the file loads into the named architecture before anyone serves it.
    build_model(checkpoint["config"]["arch"], len(splits["classes"]), "none").load_state_dict(state)
    digest = weights_digest(state)
    version = begin_export(paths, cfg.model_version, digest)  # other weights in model/: kept in versions/
    trained = dataclasses.replace(cfg, arch=checkpoint["config"]["arch"], weights=checkpoint["config"]["weights"],
                                  model_version=version)
    meta = {**build_metadata(trained, splits, metrics), "weights_sha256": digest}
    # bf16/int8 only where answers hold. Its pass over val, in fp32 and bf16, is the only one the state_dict makes:
    # the trust fit takes the serving precision's outputs, the engines' answers are compared with fp32's.
    meta["serve_precision"], val = precision_record(trained, paths, meta, state)
    (paths.model / files.SCORES).unlink(missing_ok=True)  # a previous export's bank belongs to other weights
    entry = fit_trust(trained, paths, meta, state, val)  # calibration and "none of these", in the serving precision
    if entry is not None:
        meta["trust"] = entry
    meta["backends"] = backends_record(paths, meta, state, val.fp32 if val else None, cfg.serve_backend,
                                       int8=cfg.serve_precision == "int8")  # model.onnx, the engines
    license_summary = _license_summary(paths)
    if license_summary:
        meta["data_licenses"] = license_summary
    atomic_torch_save(paths.model / files.WEIGHTS, state)
    atomic_write_json(paths.model / files.INDEX_TO_NAME, {str(i): c for i, c in enumerate(splits["classes"])})
    atomic_write_json(paths.model / TEST_SPLIT_FILE, test_split_record(splits))  # what the next version is compared on
    atomic_write_json(paths.model / files.METADATA, meta)
    print(f"export: {paths.model} version {version} ({meta['arch']}, classes {json.dumps(meta['classes'])})")
    return paths.model
