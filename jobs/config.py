"""The job's configuration: one dataclass, loaded from YAML and overridden from the command line.

Every field is a config key *and* a CLI option of the same name (``epochs`` <-> ``--epochs``).
Each key's definition is the one source of truth for: its type (the field's type hint), its
default, its allowed range, the commands that take it (``commands``), and whether it changes the
training trajectory (``trajectory``: a checkpoint made with another value is not resumed) or a
cache key (``cache``). The CLI options, ``TRAJECTORY_KEYS``, the cache keys and the key table of
docs/configuration.md are all derived from here.

The precedence is: dataclass default < the run folder's saved ``config.yaml`` < ``--config`` YAML
file < explicit CLI option.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from handler.capture import DEFAULT_BELOW, DEFAULT_MAX_FILES, DEFAULT_MAX_MB, DEFAULT_SAMPLE
from jobs.errors import JobError


class ConfigError(JobError):
    """A config file or option the user must fix; the message names the key."""


AUTO_VERSION = "auto"  # model_version: the next version, counted by jobs.versions
# serve_backend's choices: handler.engines.BACKENDS, spelled out so the config does not import torch.
SERVE_BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "openvino-int8")
# The commands that define a run save the effective config; the others only read it.
RUN_DEFINING = ("run", "collect", "clean", "audit", "split", "train")
COLLECT, CLEAN, AUDIT, SPLIT, TRAIN = ("collect",), ("clean",), ("audit",), ("split",), ("train",)
EVALUATE, EXPORT, ARCHIVE = ("evaluate",), ("export",), ("archive", "export-kserve")
TRITON = ("export-triton",)  # reads the run's config and records nothing
SERVE, REVIEW = ("serve",), ("review",)
# Where a key is used at run time by several commands (device/precision by train and evaluate).
RUNTIME = AUDIT + TRAIN + EVALUATE


def _key(default: Any, help: str, *, commands: tuple[str, ...], trajectory: bool = False,
         cache: tuple[str, ...] = (), lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         choices: tuple[str, ...] | None = None) -> Any:
    """One config key. ``lo``/``hi``: the allowed closed range (``lo_open``: lo itself excluded)."""
    meta = {"help": help, "commands": commands, "trajectory": trajectory, "cache": cache, "lo": lo, "hi": hi,
            "lo_open": lo_open, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # -- collect -------------------------------------------------------------------------------
    terms: list[str] = _key(["puppies", "kittens"], "Search terms, one class each (CLI: --terms a,b).", commands=COLLECT)
    images_per_term: int = _key(35, "How many images to collect per search term.", commands=COLLECT, lo=1, hi=10**7)
    source: str = _key("openverse", "Image source: openverse, wikimedia, bing or urls.", commands=COLLECT, choices=("openverse", "wikimedia", "bing", "urls"))
    endpoint: str | None = _key(None, "Override the source's base URL (a Bing-v7-compatible endpoint, a mirror, a test server).", commands=COLLECT)
    licenses: str = _key("commercial,modification", "Openverse license filter: a license_type list (e.g. 'commercial,modification') or license codes ('by,by-sa,cc0'); empty = any.", commands=COLLECT)
    urls_file: str | None = _key(None, "For source 'urls': a text/CSV file of 'class,url' lines, or a folder of <class>.txt files.", commands=COLLECT)
    user_agent: str = _key(
        "jobs/0.1 (+https://github.com/; batch image collection for model training)",
        "HTTP User-Agent; Wikimedia requires a descriptive one with a contact.", commands=COLLECT,
    )
    api_key_env: str = _key("IMAGE_SEARCH_API_KEY", "Environment variable holding the source's API key/token (Bing key, Openverse bearer token).", commands=COLLECT)
    download_workers: int = _key(8, "Concurrent downloads.", commands=COLLECT, lo=1, hi=512)
    requests_per_minute: int = _key(20, "Search API requests per minute (Openverse allows about 20 anonymously).", commands=COLLECT, lo=1, hi=100_000)
    max_download_mb: float = _key(20.0, "Abort any single download larger than this.", commands=COLLECT, lo=0, lo_open=True, hi=100_000)
    allow_private_addresses: bool = _key(False, "Allow URLs that resolve to loopback/private addresses (local testing only).", commands=COLLECT)
    download_timeout: float = _key(30.0, "Seconds one image download may take in all (redirects and retries included), however slowly the bytes arrive.", commands=COLLECT, lo=0, lo_open=True, hi=86_400)
    collect_deadline_minutes: float = _key(0.0, "Stop collecting after this many minutes and keep what is there; the same command continues (0 = no deadline).", commands=COLLECT, lo=0, hi=10**7)
    disallowed_header_directives: list[str] = _key(["noai", "noimageai", "noindex", "noimageindex"], "Skip images whose X-Robots-Tag response header carries one of these directives (empty = ignore the header).", commands=COLLECT)
    # -- clean ---------------------------------------------------------------------------------
    min_image_size: int = _key(32, "Exclude images whose short side is below this many pixels.", commands=CLEAN, cache=("clean",), lo=0, hi=100_000)
    min_images_per_class: int = _key(5, "Refuse to train when a class has fewer clean images than this (collect: the minimum a deadline may leave).", commands=COLLECT + CLEAN, lo=1, hi=10**9)
    max_image_pixels: int = _key(89_478_485, "Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS).", commands=CLEAN, cache=("clean",), lo=1, hi=10**12)
    follow_symlinks: bool = _key(False, "Clean: follow symbolic links that lead outside --data (by default they are excluded as outside_data).", commands=CLEAN)
    # -- audit ---------------------------------------------------------------------------------
    label_issues: str = _key("flag", "Audit: what to do with likely wrong labels: flag (list them for review) or exclude (also leave them out of every split).", commands=AUDIT + SPLIT, choices=("flag", "exclude"))
    # Audit defaults, chosen with `python -m bench.audit` (bench/README.md "Audit", docs/audit.md) on copies
    # (half size, JPEG q50, 10 % crop, brightness +-20 %, rotation +-5 degrees) of hymenoptera and pets-sample
    # photos, with EfficientNet-Lite0 ImageNet features and with a resnet18 fine-tuned on hymenoptera by the
    # job, and on 5,050 drawn photos with random weights. pHash 8: resized, re-encoded and brightened copies
    # stay within 4 bits; different photos came no closer than 14 (natural) and 10 (drawn). Feature ratio
    # 0.4: crops reach 0.36 and rotations 0.18 on ImageNet features; different photos within 24 bits start
    # at 0.65 there and at 0.46 on the fine-tuned backbone (0.5 made 1 false pair there, 0.6 made 5).
    # Agree 24: rotations move the pHash up to 22 bits. Mutual 16: different photos that were each other's
    # nearest neighbour differed in 22+ bits; 0 (off) lost a tenth of the copies on the fine-tuned backbone.
    # Together: recall 1.0 (ImageNet) and 0.95 (fine-tuned) with no false pair. Veto quantile 0.95 (issue 27):
    # on Lite0 features copies kept cosine >= 0.46 (a 150 px scene photo halved) while the 95th percentile of
    # unrelated pairs was 0.28 (hymenoptera, pets) to 0.39 (scenes); it vetoed the one pair of different photos
    # within 8 bits among 2,400 scenes (cosine 0.33) and no copy; 0.99 (0.56 on scenes) vetoed 7 copies.
    # Label skill 0.5: random weights score about 0 and ImageNet features 0.92-0.94 (0.66-0.72 with 10 % of
    # labels flipped).
    audit_hash_radius: int = _key(8, "Audit: photos whose perceptual hashes differ in at most this many of 64 bits are near-duplicates.", commands=AUDIT, lo=0, hi=32)
    audit_feature_ratio: float = _key(0.4, "Audit: photos whose feature distance is at most this fraction of their distance to their k-th nearest neighbours are near-duplicates, when their pHashes agree within audit_agree_radius.", commands=AUDIT, lo=0, hi=1)
    audit_agree_radius: int = _key(24, "Audit: pHash bits (of 64) two photos may differ in and still be near-duplicates by their features.", commands=AUDIT, lo=0, hi=64)
    audit_mutual_radius: int = _key(16, "Audit: pHash bits (of 64) two photos that are each other's nearest neighbour in features may differ in and still be near-duplicates.", commands=AUDIT, lo=0, hi=64)
    audit_veto_quantile: float = _key(0.95, "Audit: when the features can judge (labels judged), two photos whose feature cosine is below this quantile of the cosines of unrelated photo pairs are no near-duplicates, whatever their pHash.", commands=AUDIT, lo=0, hi=1)
    # audit_confirm_quantile 0.999: a pHash pair whose features neither sit closer than the photos around them nor above
    # this quantile of unrelated pairs is no near-duplicate. On 25,000 photos 6 different drawn pictures sat 8 bits apart
    # at cosine 0.37-0.63 and ratio 0.99-1.70; near-identical burst shots (16 of one scene, each other's neighbours, so
    # 35 % of their pairs at ratio > 1) kept cosine 0.79+, where the scenes sample's 0.999 quantile is 0.72.
    audit_confirm_quantile: float = _key(0.999, "Audit: when the features can judge, photos whose pHashes agree are near-duplicates only if their features confirm it: closer than the photos around them, or a cosine above this quantile of the cosines of unrelated photo pairs.", commands=AUDIT, lo=0, hi=1)
    audit_folds: int = _key(5, "Audit: folds of the out-of-fold head whose predictions find label issues.", commands=AUDIT, lo=2, hi=100)
    # audit_exact_max: exact search (one BLAS product per block) beat the HNSW index (built on one thread) up to 100,000 photos on the 2-core Xeon:
    # 293 s against 509 s there; growing 3-7x per doubling against 2.8x, they cross near 180,000-290,000 (extrapolated; `python -m bench.audit_index`).
    audit_exact_max: int = _key(200_000, "Audit: up to this many photos the nearest-neighbour search is exact; above it a faiss HNSW index (approximate; audit.json's settings.neighbour_search says which ran).", commands=AUDIT, lo=0, hi=10**9)
    audit_label_min_skill: float = _key(0.5, "Audit: judge labels only when the out-of-fold head's balanced accuracy is this far from chance (0) towards perfect (1); below it no label issue is flagged.", commands=AUDIT, lo=0, hi=1)
    # -- split ---------------------------------------------------------------------------------
    val_fraction: float = _key(0.1, "Fraction of each class held out for validation.", commands=SPLIT, lo=0, hi=0.99)
    test_fraction: float = _key(0.1, "Fraction of each class held out for the final test.", commands=SPLIT, lo=0, hi=0.99)
    seed: int = _key(42, "Seed for the split, augmentation and initialisation.", commands=COLLECT + AUDIT + SPLIT + TRAIN, trajectory=True, cache=("features",), lo=0, hi=2**32 - 1)
    # -- model ---------------------------------------------------------------------------------
    arch: str = _key("resnet18", "Backbone: a torchvision architecture (resnet18/34/50, efficientnet_b0, convnext_tiny, ...) or timm/<name> (timm/tf_efficientnet_lite0, ...).", commands=AUDIT + TRAIN, trajectory=True, cache=("features",))
    weights: str = _key("imagenet", "Backbone weights: 'imagenet' (the library's pretrained weights: torchvision's in TORCH_HOME, timm's from the Hugging Face hub), 'none', or a path to a state_dict.", commands=AUDIT + TRAIN, trajectory=True, cache=("features",))
    freeze_backbone: bool = _key(True, "Train only the new classifier head (the frozen stage).", commands=TRAIN, trajectory=True)
    # -- train ---------------------------------------------------------------------------------
    # epochs, finetune_epochs and patience are not trajectory keys on purpose: raising them continues a run.
    epochs: int = _key(25, "Epochs of the head (frozen-backbone) stage.", commands=TRAIN, lo=0, hi=100_000)
    batch_size: int = _key(32, "Global batch size (split across ranks under torchrun); for evaluate, its own batch size.", commands=TRAIN + EVALUATE, trajectory=True, lo=1, hi=65_536)
    lr: float = _key(0.002, "Peak learning rate of the head (AdamW), decayed to 0 by a cosine over each stage.", commands=TRAIN, trajectory=True, lo=0, lo_open=True, hi=10)
    weight_decay: float = _key(0.0, "AdamW weight decay (0 = plain Adam semantics).", commands=TRAIN, trajectory=True, lo=0, hi=10)
    feature_views: int = _key(5, "Cached-feature stage: augmented views per training image (view 0 = eval transform).", commands=TRAIN, trajectory=True, cache=("features",), lo=1, hi=256)
    cache_features: bool = _key(True, "Train the frozen head on cached backbone features (falls back to the full loop when impossible).", commands=TRAIN, trajectory=True)
    finetune_epochs: int = _key(0, "Epochs of the unfrozen fine-tune stage after the head stage (0 = off).", commands=TRAIN, lo=0, hi=100_000)
    backbone_lr_div: float = _key(10.0, "Fine-tune stage: backbone lr = lr / this.", commands=TRAIN, trajectory=True, lo=0, lo_open=True, hi=1e6)
    warmup_epochs: float = _key(1.0, "Fine-tune stage: linear warmup before the cosine schedule.", commands=TRAIN, trajectory=True, lo=0, hi=100_000)
    patience: int = _key(5, "Fine-tune stage: stop after this many epochs without a better val loss.", commands=TRAIN, lo=0, hi=100_000)
    grad_clip: float = _key(1.0, "Fine-tune stage: clip the gradient norm to this (0 = off).", commands=TRAIN, trajectory=True, lo=0, hi=1e9)
    freeze_bn: bool = _key(True, "Fine-tune stage: keep BatchNorm running statistics frozen.", commands=TRAIN, trajectory=True)
    sync_bn: bool = _key(False, "Fine-tune stage under torchrun: convert BatchNorm to SyncBatchNorm.", commands=TRAIN)
    checkpoint_minutes: float = _key(10.0, "Also checkpoint inside an epoch every this many minutes (0 = epoch ends only); SIGTERM always checkpoints.", commands=TRAIN, lo=0, hi=100_000)
    device: str = _key("auto", "auto (CUDA when available), cpu, cuda or cuda:N.", commands=RUNTIME)
    precision: str = _key("auto", "auto (bf16/fp16 autocast where native: GPUs, CPUs with AVX512-BF16/AMX), fp32, bf16 or fp16.", commands=RUNTIME, cache=("features",), choices=("auto", "fp32", "bf16", "fp16"))
    channels_last: bool = _key(True, "Use the channels_last memory format.", commands=RUNTIME, cache=("features",))
    compile: bool = _key(False, "Wrap the model in torch.compile.", commands=TRAIN)
    num_workers: int = _key(-1, "DataLoader workers (-1 = from the CPU count).", commands=RUNTIME, lo=-1, hi=256)
    deterministic: bool = _key(False, "Deterministic kernels and single-threaded data loading (exactly reproducible on CPU).", commands=RUNTIME)
    # -- archive / serve -----------------------------------------------------------------------
    model_name: str = _key("classifier", "Name of the served model: /predictions/<model_name>.", commands=EXPORT + ARCHIVE + TRITON)
    model_version: str = _key(AUTO_VERSION, "Version of the exported model and its archive; auto: 1.0 at the first export, then the next whole number (2.0, ...) whenever the weights change (docs/run-folder.md); archive packs the exported model's.", commands=EXPORT)
    model_store: str | None = _key(None, "Where the .mar goes (default <out>/model-store).", commands=ARCHIVE)
    topk: int = _key(5, "Predictions returned per image (capped at the number of classes).", commands=EXPORT + ARCHIVE + TRITON, lo=1, hi=100_000)
    serve_batch_size: int = _key(8, "The largest batch the server forms: TorchServe batchSize, Triton max_batch_size.", commands=ARCHIVE + TRITON, lo=1, hi=4096)
    max_batch_delay_ms: int = _key(20, "How long a batch waits to fill, in milliseconds: TorchServe maxBatchDelay, Triton's dynamic batching queue delay.", commands=ARCHIVE + TRITON, lo=0, hi=600_000)
    min_workers: int = _key(1, "TorchServe minWorkers.", commands=ARCHIVE, lo=0, hi=256)
    max_workers: int = _key(1, "TorchServe maxWorkers.", commands=ARCHIVE, lo=1, hi=256)
    response_timeout: int = _key(120, "TorchServe responseTimeout in seconds.", commands=ARCHIVE, lo=1, hi=86_400)
    startup_timeout: int = _key(120, "TorchServe startupTimeout in seconds.", commands=ARCHIVE, lo=1, hi=86_400)
    max_batch_pixels: int = _key(200_000_000, "Pixels one served batch may decode (a request above it gets 413).", commands=ARCHIVE + TRITON, lo=1, hi=10**12)
    serve_precision: str = _key("auto", "auto: bf16 where native and the export check allows, else fp32; int8: also offer PyTorch int8 when it is faster at <= 0.5 points of val accuracy lost, and quantize model.onnx for OpenVINO (NNCF; the engine openvino-int8 where its answers pass the export's check).", commands=EXPORT, choices=("auto", "int8"))
    serve_backend: str = _key("auto", "The engine the served model runs on: auto (each engine the export admitted runs a few batches when a worker starts; the fastest serves), torch, onnxruntime, openvino or openvino-int8 (torch where the one named was not admitted or is not installed). Export with torch writes no model.onnx and checks no engine.", commands=EXPORT + ARCHIVE, choices=SERVE_BACKENDS)
    serve_tuning: str = _key("machine", "machine: the server picks workers/batching for its machine; archive: pack serve_batch_size, max_batch_delay_ms, min/max_workers into the .mar.", commands=ARCHIVE, choices=("machine", "archive"))
    # -- trust ---------------------------------------------------------------------------------
    ood_keep: float = _key(0.95, "Export: the share of in-distribution val images the \"unlike the training images\" threshold keeps (the rest of such images are abstained on).", commands=EXPORT, lo=0, lo_open=True, hi=1)
    min_confidence: float = _key(0.0, "Export: also abstain (\"low confidence\") when the calibrated top probability is below this (0 = off).", commands=EXPORT, lo=0, hi=1)
    ood_data: str | None = _key(None, "Evaluate: a folder of images of none of the classes; the report measures how well the model tells them apart (AUROC, abstain rate).", commands=EVALUATE)
    # -- capture (docs/serving.md "Capture") ------------------------------------------------------------
    capture: str | None = _key(None, "Serve: keep what the model met in this folder: every image it abstained on, the answers under capture_below, a capture_sample of the rest (off when unset).", commands=SERVE)
    capture_below: float = _key(DEFAULT_BELOW, "Serve, with capture: also keep the answers whose calibrated top probability is below this (separate from min_confidence).", commands=SERVE, lo=0, hi=1)
    capture_sample: float = _key(DEFAULT_SAMPLE, "Serve, with capture: the share of the other answers kept, at random.", commands=SERVE, lo=0, hi=1)
    capture_max_mb: float = _key(DEFAULT_MAX_MB, "Serve, with capture: the folder's cap in MiB; the oldest captures go first.", commands=SERVE, lo=0, lo_open=True, hi=1e9)
    capture_max_files: int = _key(DEFAULT_MAX_FILES, "Serve, with capture: the folder's cap in files (an image and its record are two); the oldest go first.", commands=SERVE, lo=2, hi=10**9)
    captured: str | None = _key(None, "Review and run: a capture folder (what capture kept); review shows its images grouped by likeness, and clean brings in those decisions.json labels (docs/audit.md).", commands=CLEAN + REVIEW)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def key_names() -> list[str]:
    return [f.name for f in fields(Config)]


def keys_for(command: str) -> tuple[str, ...]:
    """The keys a command takes: ``run`` takes them all."""
    return tuple(f.name for f in fields(Config) if command == "run" or command in f.metadata["commands"])


def keys_where(flag: str, value: Any = True) -> tuple[str, ...]:
    """Keys whose definition has ``flag`` (``trajectory``) or lists ``value`` under it (``cache``)."""
    meta = {f.name: f.metadata[flag] for f in fields(Config)}
    return tuple(k for k, v in meta.items() if (value in v if isinstance(v, tuple) else v == value))


TRAJECTORY_KEYS = keys_where("trajectory")
FEATURE_CACHE_KEYS = keys_where("cache", "features")
CLEAN_CACHE_KEYS = keys_where("cache", "clean")


@cache
def _types() -> dict[str, Any]:
    return typing.get_type_hints(Config)


def key_type(name: str) -> Any:
    """The key's type with ``| None`` removed (``str | None`` -> ``str``)."""
    hint = _types()[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def optional(name: str) -> bool:
    hint = _types()[name]
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def type_name(name: str) -> str:
    kind = key_type(name)
    return "list" if typing.get_origin(kind) is list else kind.__name__


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML or CLI value into the field's type, naming the key when it cannot."""
    f = next(f for f in fields(Config) if f.name == name)
    kind = key_type(name)
    if value is None:
        if optional(name):
            return None
        raise ConfigError(f"config key '{name}' cannot be empty ({f.metadata['help']})")
    try:
        if typing.get_origin(kind) is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",")]
            if not isinstance(value, list):
                raise ValueError(value)
            return [str(v) for v in value if str(v)]
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if kind is int:
            number = float(value)
            if isinstance(value, bool) or not math.isfinite(number) or number != int(number):
                raise ValueError(value)
            return int(number) if not isinstance(value, int) else value
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if isinstance(value, (dict, list)):
            raise ValueError(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"config key '{name}' expects {type_name(name)}, got {value!r}") from None


def describe_range(name: str) -> str:
    m = next(f for f in fields(Config) if f.name == name).metadata
    if m["choices"]:
        return "one of " + ", ".join(m["choices"])
    if m["lo"] is None and m["hi"] is None:
        return ""
    return f"{'(' if m['lo_open'] else '['}{_num(m['lo'])}, {_num(m['hi'])}]"


def _num(x: float | None) -> str:
    return "-inf" if x is None else f"{x:g}" if isinstance(x, float) else str(x)


def _validate(cfg: Config) -> None:
    """Every number finite and in its key's range, every choice known; one line naming the key."""
    for f in fields(Config):
        value, m = getattr(cfg, f.name), f.metadata
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low_ok = m["lo"] is None or (value > m["lo"] if m["lo_open"] else value >= m["lo"])
            high_ok = m["hi"] is None or value <= m["hi"]
            if not math.isfinite(value) or not low_ok or not high_ok:
                raise ConfigError(f"config key '{f.name}' must be a finite number in {describe_range(f.name)} "
                                  f"(got {value!r})")
        if m["choices"] and value not in m["choices"]:
            raise ConfigError(f"config key '{f.name}' must be {describe_range(f.name)} (got {value!r})")

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"config key '{key}' {why} (got {getattr(cfg, key)!r})")

    if cfg.val_fraction + cfg.test_fraction >= 1:
        raise bad("test_fraction", "must leave room for training with val_fraction")
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


def key_table_markdown() -> str:
    """The key table of docs/configuration.md, generated from the definitions (a test keeps the page in step)."""
    defaults = Config()
    rows = ["| key | type | default | range | commands | changes | meaning |", "|---|---|---|---|---|---|---|"]
    for f in fields(Config):
        default = getattr(defaults, f.name)
        shown = ",".join(default) if isinstance(default, list) else default
        commands = ", ".join(f.metadata["commands"])
        flags = "trajectory" if f.metadata["trajectory"] else ""
        if f.metadata["cache"]:
            flags = ", ".join(filter(None, [flags, *(f"{c} cache" for c in f.metadata["cache"])]))
        rows.append(f"| `{f.name}` | {type_name(f.name)} | `{shown}` | {describe_range(f.name)} | {commands} | "
                    f"{flags} | {f.metadata['help']} |")
    return "\n".join(rows)


SAVED_HEADER = "# jobs config: {n} keys. Written by the commands that define this run; edit values, not the key list."
_HEADER_RE = r"^# jobs config: (\d+) keys"


def _read_yaml(p: Path, rebuild: str | None = None) -> dict[str, Any]:
    """A YAML mapping. ``rebuild``: how to recreate the file, for the error of a damaged run file."""
    fix = f"; {rebuild}" if rebuild else "; fix its syntax"
    try:
        text = p.read_text()
        loaded = yaml.safe_load(text) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}; pass an existing YAML file to --config") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]}){fix}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must be a mapping of key: value{fix}")
    if rebuild:
        import re

        header = re.match(_HEADER_RE, text)
        if header and int(header.group(1)) != len(loaded):
            raise ConfigError(f"config file {p} is damaged: it was written with {header.group(1)} keys and now has "
                              f"{len(loaded)}{fix}")
    return loaded


def saved_rebuild_hint(p: Path) -> str:
    return (f"restore it, or delete it and re-run the same command with the same options "
            f"(keys not given then take their defaults): rm {p}")


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                saved: str | os.PathLike | None = None) -> Config:
    """Defaults < ``saved`` (a run's own config.yaml) < the YAML file at ``path`` < ``overrides``.

    None values in ``overrides`` mean "not given". Keys in ``saved`` that this version no longer
    knows are dropped: that file is ours, not the user's.
    """
    known = set(key_names())
    values: dict[str, Any] = {}
    if saved is not None and Path(saved).is_file():
        values.update({k: v for k, v in _read_yaml(Path(saved), saved_rebuild_hint(Path(saved))).items()
                       if k in known})
    if path is not None:
        values.update(_read_yaml(Path(path)))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for name in values:
        if name not in known:
            squashed = {k.replace("_", ""): k for k in known}
            close = difflib.get_close_matches(str(name).replace("_", "").replace("-", ""), squashed, n=1, cutoff=0.8)
            close = [squashed[c] for c in close]
            hint = f"; did you mean '{close[0]}'?" if close else "; see `python -m jobs run --help` for the keys"
            raise ConfigError(f"unknown config key '{name}'{hint}")
    cfg = Config(**{k: _coerce(k, v) for k, v in values.items()})
    _validate(cfg)
    return cfg


def saved_yaml(values: dict[str, Any]) -> str:
    return SAVED_HEADER.format(n=len(values)) + "\n" + yaml.safe_dump(values, sort_keys=False)


def record_keys(paths: RunPaths, cfg: Config, keys: tuple[str, ...]) -> dict[str, Any]:
    """The run's saved config with only ``keys`` taken from ``cfg``: what archive records of itself.

    The training keys stay as the run defined them, whatever this command was given.
    """
    base = Config().to_dict()
    if paths.config.is_file():
        base.update({k: v for k, v in _read_yaml(paths.config, saved_rebuild_hint(paths.config)).items()
                     if k in base})
    base.update({k: getattr(cfg, k) for k in keys})
    return base


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
    def audit(self) -> Path:
        return self.out / "audit.json"

    @property
    def decisions(self) -> Path:
        return self.out / "decisions.json"

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
    def versions(self) -> Path:
        return self.out / "versions"

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
