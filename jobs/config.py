"""The job's configuration: one dataclass, loaded from YAML and overridden from the command line.

Every field is a config key *and* a CLI option of the same name (``epochs`` <-> ``--epochs``).
The precedence is: dataclass default < ``--config`` YAML file < explicit CLI option.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from jobs.errors import JobError


class ConfigError(JobError):
    """A config file or option the user must fix; the message names the key."""


def _key(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # -- collect -------------------------------------------------------------------------------
    terms: list[str] = _key(["puppies", "kittens"], "Search terms, one class each (CLI: --terms a,b).")
    images_per_term: int = _key(35, "How many images to collect per search term.")
    source: str = _key("openverse", "Image source: openverse, wikimedia, bing or urls.")
    endpoint: str | None = _key(None, "Override the source's base URL (a Bing-v7-compatible endpoint, a mirror, a test server).")
    licenses: str = _key("commercial,modification", "Openverse license filter: a license_type list (e.g. 'commercial,modification') or license codes ('by,by-sa,cc0'); empty = any.")
    urls_file: str | None = _key(None, "For source 'urls': a text/CSV file of 'class,url' lines, or a folder of <class>.txt files.")
    user_agent: str = _key(
        "image-classifier-pipeline/0.1 (+https://github.com/; batch image collection for model training)",
        "HTTP User-Agent; Wikimedia requires a descriptive one with a contact.",
    )
    api_key_env: str = _key("IMAGE_SEARCH_API_KEY", "Environment variable holding the source's API key/token (Bing key, Openverse bearer token).")
    download_workers: int = _key(8, "Concurrent downloads.")
    requests_per_minute: int = _key(20, "Search API requests per minute (Openverse allows about 20 anonymously).")
    max_download_mb: float = _key(20.0, "Abort any single download larger than this.")
    allow_private_addresses: bool = _key(False, "Allow URLs that resolve to loopback/private addresses (local testing only).")
    # -- clean ---------------------------------------------------------------------------------
    min_image_size: int = _key(32, "Exclude images whose short side is below this many pixels.")
    min_images_per_class: int = _key(5, "Refuse to train when a class has fewer clean images than this.")
    max_image_pixels: int = _key(89_478_485, "Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS).")
    # -- split ---------------------------------------------------------------------------------
    val_fraction: float = _key(0.1, "Fraction of each class held out for validation.")
    test_fraction: float = _key(0.1, "Fraction of each class held out for the final test.")
    seed: int = _key(42, "Seed for the split, augmentation and initialisation.")
    # -- model ---------------------------------------------------------------------------------
    arch: str = _key("resnet18", "torchvision architecture name (resnet18/34/50, efficientnet_b0, mobilenet_v3_large, convnext_tiny, ...).")
    weights: str = _key("imagenet", "Backbone weights: 'imagenet' (torchvision, cached in TORCH_HOME), 'none', or a path to a state_dict.")
    freeze_backbone: bool = _key(True, "Train only the new classifier head (the frozen stage).")
    # -- train ---------------------------------------------------------------------------------
    epochs: int = _key(25, "Epochs of the head (frozen-backbone) stage.")
    batch_size: int = _key(32, "Global batch size (split across ranks under torchrun).")
    lr: float = _key(0.002, "Peak learning rate of the head (AdamW), decayed to 0 by a cosine over each stage.")
    weight_decay: float = _key(0.0, "AdamW weight decay (0 = plain Adam semantics).")
    feature_views: int = _key(5, "Cached-feature stage: augmented views per training image (view 0 = eval transform).")
    cache_features: bool = _key(True, "Train the frozen head on cached backbone features (falls back to the full loop when impossible).")
    finetune_epochs: int = _key(0, "Epochs of the unfrozen fine-tune stage after the head stage (0 = off).")
    backbone_lr_div: float = _key(10.0, "Fine-tune stage: backbone lr = lr / this.")
    warmup_epochs: float = _key(1.0, "Fine-tune stage: linear warmup before the cosine schedule.")
    patience: int = _key(5, "Fine-tune stage: stop after this many epochs without a better val loss.")
    grad_clip: float = _key(1.0, "Fine-tune stage: clip the gradient norm to this (0 = off).")
    freeze_bn: bool = _key(True, "Fine-tune stage: keep BatchNorm running statistics frozen.")
    sync_bn: bool = _key(False, "Fine-tune stage under torchrun: convert BatchNorm to SyncBatchNorm.")
    device: str = _key("auto", "auto (CUDA when available), cpu, cuda or cuda:N.")
    precision: str = _key("auto", "auto (bf16/fp16 autocast where supported), fp32, bf16 or fp16.")
    channels_last: bool = _key(True, "Use the channels_last memory format.")
    compile: bool = _key(False, "Wrap the model in torch.compile.")
    num_workers: int = _key(-1, "DataLoader workers (-1 = from the CPU count).")
    deterministic: bool = _key(False, "Deterministic kernels and single-threaded data loading (exactly reproducible on CPU).")
    # -- archive / serve -----------------------------------------------------------------------
    model_name: str = _key("classifier", "Name of the served model: /predictions/<model_name>.")
    model_version: str = _key("1.0", "Version written into the model archive.")
    model_store: str | None = _key(None, "Where the .mar goes (default <out>/model-store).")
    topk: int = _key(5, "Predictions returned per image (capped at the number of classes).")
    serve_batch_size: int = _key(8, "TorchServe batchSize for the model.")
    max_batch_delay_ms: int = _key(20, "TorchServe maxBatchDelay in milliseconds.")
    min_workers: int = _key(1, "TorchServe minWorkers.")
    max_workers: int = _key(1, "TorchServe maxWorkers.")
    response_timeout: int = _key(120, "TorchServe responseTimeout in seconds.")
    startup_timeout: int = _key(120, "TorchServe startupTimeout in seconds.")
    max_batch_pixels: int = _key(200_000_000, "Pixels one served batch may decode (a request above it gets 413).")
    serve_precision: str = _key("auto", "auto: bf16 where native and the export check allows, else fp32; int8: "
                                        "also offer int8 when it is faster at <= 0.5 points of val accuracy lost.")
    serve_tuning: str = _key("machine", "machine: the server picks workers/batching for its machine; archive: "
                                        "pack serve_batch_size, max_batch_delay_ms, min/max_workers into the .mar.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def key_names() -> list[str]:
    return [f.name for f in fields(Config)]


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML or CLI value into the field's type, naming the key when it cannot."""
    f = next(f for f in fields(Config) if f.name == name)
    kind = str(f.type)
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"config key '{name}' cannot be empty ({f.metadata['help']})")
    try:
        if kind.startswith("list"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",")]
            return [str(v) for v in value if str(v)]
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if kind == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError(value)
            return int(float(value))
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{name}' expects {kind}, got {value!r}") from None


def _validate(cfg: Config) -> None:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"config key '{key}' {why} (got {getattr(cfg, key)!r})")

    if not 0 <= cfg.val_fraction < 1:
        raise bad("val_fraction", "must be in [0, 1)")
    if not 0 <= cfg.test_fraction < 1 or cfg.val_fraction + cfg.test_fraction >= 1:
        raise bad("test_fraction", "must be in [0, 1) and leave room for training with val_fraction")
    for key in ("epochs", "finetune_epochs", "min_image_size", "patience"):
        if getattr(cfg, key) < 0:
            raise bad(key, "must be >= 0")
    for key in ("batch_size", "feature_views", "images_per_term", "download_workers", "topk",
                "serve_batch_size", "min_images_per_class", "requests_per_minute"):
        if getattr(cfg, key) < 1:
            raise bad(key, "must be >= 1")
    if cfg.lr <= 0:
        raise bad("lr", "must be > 0")
    if cfg.precision not in {"auto", "fp32", "bf16", "fp16"}:
        raise bad("precision", "must be one of auto, fp32, bf16, fp16")
    if cfg.source not in {"openverse", "wikimedia", "bing", "urls"}:
        raise bad("source", "must be one of openverse, wikimedia, bing, urls")
    if not (cfg.device in {"auto", "cpu", "cuda"} or cfg.device.startswith("cuda:")):
        raise bad("device", "must be auto, cpu, cuda or cuda:N")
    if cfg.max_batch_pixels < 1:
        raise bad("max_batch_pixels", "must be >= 1")
    if cfg.serve_precision not in {"auto", "int8"}:
        raise bad("serve_precision", "must be auto or int8")
    if cfg.serve_tuning not in {"machine", "archive"}:
        raise bad("serve_tuning", "must be machine or archive")
    if cfg.min_workers > cfg.max_workers:
        raise bad("min_workers", f"must not exceed max_workers ({cfg.max_workers})")


def _read_yaml(p: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}; pass an existing YAML file to --config") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]}); fix its syntax") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must be a mapping of key: value")
    return loaded


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                saved: str | os.PathLike | None = None) -> Config:
    """Defaults < ``saved`` (a run's own config.yaml) < the YAML file at ``path`` < ``overrides``.

    None values in ``overrides`` mean "not given". Keys in ``saved`` that this version no longer
    knows are dropped: that file is ours, not the user's.
    """
    known = set(key_names())
    values: dict[str, Any] = {}
    if saved is not None and Path(saved).is_file():
        values.update({k: v for k, v in _read_yaml(Path(saved)).items() if k in known})
    if path is not None:
        values.update(_read_yaml(Path(path)))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for name in values:
        if name not in known:
            close = [k for k in known if k.replace("_", "") == str(name).replace("_", "").replace("-", "")]
            hint = f"; did you mean '{close[0]}'?" if close else "; see `python -m jobs run --help` for the keys"
            raise ConfigError(f"unknown config key '{name}'{hint}")
    cfg = Config(**{k: _coerce(k, v) for k, v in values.items()})
    _validate(cfg)
    return cfg


@dataclass(frozen=True)
class RunPaths:
    """Where every stage reads and writes, all under one output folder."""

    out: Path
    model_store_dir: Path | None = None

    @property
    def raw(self) -> Path:
        return self.out / "raw"

    @property
    def dataset(self) -> Path:
        return self.out / "dataset"

    @property
    def quarantine(self) -> Path:
        return self.out / "quarantine"

    @property
    def clean_report(self) -> Path:
        return self.out / "clean_report.json"

    @property
    def splits(self) -> Path:
        return self.out / "splits.json"

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.json"

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    @property
    def model(self) -> Path:
        return self.out / "model"

    @property
    def report(self) -> Path:
        return self.out / "report"

    @property
    def model_store(self) -> Path:
        return self.model_store_dir or self.out / "model-store"

    @property
    def config(self) -> Path:
        return self.out / "config.yaml"

    @classmethod
    def for_config(cls, out: str | os.PathLike, cfg: Config) -> RunPaths:
        return cls(Path(out), Path(cfg.model_store) if cfg.model_store else None)
