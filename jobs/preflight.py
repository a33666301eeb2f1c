"""Before any work: can this command have what it will fetch from the network?

Two things are fetched late, minutes into a run, where an offline machine used to end in a long
traceback: the ImageNet weights (torchvision's download into TORCH_HOME; for ``timm/<name>`` archs,
the Hugging Face hub or timm's URL) and the image search of ``collect``. Each command checks at its
start what it needs: a cached file passes at once, and otherwise one TCP connection to where the
download would go (the host, or the proxy that urllib and requests would use for it) tells within
``CONNECT_TIMEOUT_S``. A failure is one line naming what failed and the offline way instead. Nothing
is downloaded or written here.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from jobs.config import Config, RunPaths, keys_for
from jobs.errors import JobError, shown_program

CONNECT_TIMEOUT_S = 3.0
OFFLINE_WEIGHTS_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "offline_weights.py"
OFFLINE_ARCH = "timm/tf_efficientnet_lite0"
OFFLINE_WEIGHTS_FILE = "weights/tf_efficientnet_lite0.pth"


class OfflineError(JobError):
    """Something a command needs from the network cannot be reached, and no cached copy is there."""


def check(command: str, cfg: Config, paths: RunPaths, data: str | os.PathLike | None = None) -> None:
    """Raise OfflineError (or JobError) when ``command`` could not get what it will fetch; return quietly
    otherwise. Commands that build the backbone take the ``weights`` key; ``collect`` and ``run`` without
    ``data`` search the ``source``."""
    keys = keys_for(command)
    if "weights" in keys:
        check_weights(cfg.arch, cfg.weights)
    if "source" in keys and data is None:
        check_source(cfg, paths)


def check_weights(arch: str, weights: str) -> None:
    from handler.model import TIMM_PREFIX, is_timm
    from jobs.model import weights_tag

    if weights != "imagenet":
        weights_tag(weights)  # a weights file that is not there is named now, not after clean
        return
    where = _timm_weights(arch.removeprefix(TIMM_PREFIX)) if is_timm(arch) else _torchvision_weights(arch)
    if where is None:
        return  # an arch without known ImageNet weights: building the model names the problem
    url, cached, cache_place = where
    if cached:
        return
    reason = unreachable(url)
    if reason:
        raise OfflineError(f"cannot download the ImageNet weights for {arch} ({reason}: {url}) and they are not in "
                           f"{cache_place}; offline, use --weights none, a local state_dict (--weights FILE), or the "
                           f"offline real backbone: {offline_backbone_hint()}")


def offline_backbone_hint() -> str:
    """How to make and use the real ImageNet backbone that needs no network (scripts/offline_weights.py)."""
    script = shown_program(OFFLINE_WEIGHTS_SCRIPT) if OFFLINE_WEIGHTS_SCRIPT.is_file() else "scripts/offline_weights.py"
    return (f"`{shown_program(sys.executable)} {script} {OFFLINE_WEIGHTS_FILE}`, then "
            f"`--arch {OFFLINE_ARCH} --weights {OFFLINE_WEIGHTS_FILE}`")


def _torchvision_weights(arch: str) -> tuple[str, bool, str] | None:
    """(URL, cached?, where the cache is) of torchvision's DEFAULT weights for ``arch``."""
    import torch.hub
    from torchvision import models

    try:
        url = models.get_model_weights(arch).DEFAULT.url
    except (ValueError, KeyError, AttributeError):
        return None
    # torch.hub.load_state_dict_from_url's cache: <hub dir>/checkpoints/<the URL's file name>
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(url).path).name
    return url, cached.is_file(), str(cached)


def _timm_weights(name: str) -> tuple[str, bool, str] | None:
    """(URL, cached?, where the cache is) of timm's pretrained weights for ``name``: the Hugging Face hub
    when the model has a hub id (timm prefers it), else timm's URL through torch.hub's cache."""
    import timm

    pretrained = timm.models.get_pretrained_cfg(name)
    if pretrained is None:
        return None
    if pretrained.hf_hub_id:
        import huggingface_hub
        from huggingface_hub import constants

        repo, _, revision = pretrained.hf_hub_id.partition("@")
        # timm.models.load_state_dict_from_hf: the safetensors file when there is one, else the .bin
        names = [n for n in (pretrained.hf_hub_filename, "model.safetensors", "pytorch_model.bin") if n]
        cached = any(isinstance(huggingface_hub.try_to_load_from_cache(repo, n, revision=revision or None), str)
                     for n in names)
        if not cached and constants.HF_HUB_OFFLINE:
            raise OfflineError(f"HF_HUB_OFFLINE is set and the ImageNet weights for timm/{name} "
                               f"({repo}) are not in the Hugging Face cache {constants.HF_HUB_CACHE}; use --weights "
                               f"none, a local state_dict (--weights FILE), or the offline real backbone: "
                               f"{offline_backbone_hint()}")
        return f"{constants.ENDPOINT}/{repo}", cached, f"the Hugging Face cache {constants.HF_HUB_CACHE}"
    if pretrained.url:
        import torch.hub

        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(pretrained.url).path).name
        return pretrained.url, cached.is_file(), str(cached)
    return None


def check_source(cfg: Config, paths: RunPaths) -> None:
    from jobs.collect.sources import make_source

    source = make_source(cfg)  # a source configured wrongly (bing without a key, ...) is named here too
    url = getattr(source, "url", None)  # the URL-list source has no one search host
    if url is None or _collected_enough(cfg, paths):
        return
    reason = unreachable(url)
    if reason:
        raise OfflineError(f"cannot reach the image source {source.name} ({reason}: {url}); offline, train on "
                           "images you have instead: --data DIR (one sub-folder of images per class)")


def _collected_enough(cfg: Config, paths: RunPaths) -> bool:
    """Every term already has its images from an earlier collect: a re-run searches nothing."""
    from jobs.collect.store import MANIFEST, Manifest, term_folder_name

    for term in cfg.terms:
        folder = paths.raw / term_folder_name(term)
        kept = [e for e in Manifest(folder / MANIFEST).latest.values()
                if e.get("status") == "ok" and e.get("file") and (folder / e["file"]).is_file()]
        if len(kept) < cfg.images_per_term:
            return False
    return True


def unreachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when a TCP connection opens to where ``url`` would be fetched from (its host, or the proxy the
    environment names for it) within ``timeout``; otherwise why not, in a few words."""
    parts = urlsplit(url)
    host, port, via = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port, via = p.hostname or "", p.port or 80, f" through the proxy {proxy}"
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except socket.gaierror:
            outcome.append(f"cannot resolve {host}")
        except ConnectionRefusedError:
            outcome.append(f"connection to {host}:{port} refused")
        except TimeoutError:
            outcome.append(f"no answer from {host}:{port} within {timeout:g} s")
        except OSError as e:
            outcome.append(f"{host}:{port}: {e.strerror or type(e).__name__}")

    # A name lookup has no timeout of its own: the attempt runs aside and is given up on in time.
    attempt = threading.Thread(target=connect, name="preflight", daemon=True)
    attempt.start()
    attempt.join(timeout + 1)
    reason = outcome[0] if outcome else f"no answer from {host}:{port} within {timeout:g} s"
    return f"{reason}{via}" if reason else None
