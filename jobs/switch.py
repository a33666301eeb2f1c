"""Switch the version a running TorchServe or KServe model server answers with, with no failed request:
``jobs serve --model-store S --switch-to VERSION`` (rolling back is the same command with the older version).

Every archived version stays in ``S/.versions/<name>-<version>.mar``; ``S/<name>.mar`` is the default, the one a
server loads when it starts. The switch makes ``S/<name>.mar`` the wanted version, registers it beside the
running one through TorchServe's management API (loopback, management token) and waits for its workers,
sets it as the default version, and only then unregisters the others. Requests keep going to the old version
until the default changes, and to the new one after, so none meets a model without workers.

KServe's model server (``switch_kserve``) has no management API: there the switch is a reload. Linking the wanted
version as ``S/<name>.mar`` is all it does to the server; each worker process notices, loads the new archive
beside the one it serves and swaps (``handler.kserve_runtime.ClassifierModel.watch``), and reports what it serves
in ``<workdir>/serving/``, which the switch waits on.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import requests

from handler import scheduler
from handler.status import STATUS_DIR, process_start
from jobs.archive import VERSIONS_DIR, packed_settings, versioned_mar
from jobs.config import Config
from jobs.errors import JobError, jobs_command, shown_path
from jobs.fileio import link_or_copy
from jobs.serve import KServeRuntime, model_names, parse_properties
from jobs.versions import version_key

TIMEOUT_S = 30
# A batch's time, at most: a lone photo takes 30-90 ms on a 2-core CPU, a batch of 4 under load well under 1 s.
DRAIN_S = 2.0


class Management:
    """TorchServe's management API of the server ``jobs serve`` started with state in ``workdir``."""

    def __init__(self, workdir: Path, store: Path) -> None:
        config = workdir / "config.properties"
        if not config.is_file():
            raise JobError(f"no TorchServe started by `jobs serve` in {shown_path(workdir)}; start one with "
                           f"`{jobs_command()} serve --model-store {store} --detach`, or pass its --workdir")
        self.url = parse_properties(config.read_text())["management_address"]
        keys = workdir / "key_file.json"
        key = json.loads(keys.read_text()).get("management", {}).get("key") if keys.is_file() else None
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def call(self, method: str, path: str, timeout: float = TIMEOUT_S, **params: str | int) -> list | dict:
        try:
            r = requests.request(method, f"{self.url}{path}", params=params, headers=self.headers, timeout=timeout)
        except requests.RequestException as e:
            raise JobError(f"TorchServe's management API at {self.url} did not answer ({type(e).__name__}); "
                           "is the server still running?") from None
        if r.status_code != 200:
            said = r.json().get("message", r.text) if r.headers.get("content-type", "").startswith("application/json") \
                else r.text
            raise JobError(f"TorchServe refused {method} {path}: {r.status_code} {' '.join(str(said).split())}")
        return r.json()

    def versions(self, name: str) -> list[str]:
        return [m["modelVersion"] for m in self.call("GET", f"/models/{name}/all")]

    def default(self, name: str) -> str:
        return self.call("GET", f"/models/{name}")[0]["modelVersion"]

    def drain(self, name: str, version: str, timeout: float = TIMEOUT_S) -> None:
        """Until ``version`` (no longer the default) has answered what it was sent.

        Unregistering stops a version's workers at once, failing the batch they run (TorchServe 0.12 answers
        it 500), and the describe API shows queued jobs but not a busy worker: so wait for its queue to empty,
        then for a batch's time (``DRAIN_S``).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            described = self.call("GET", f"/models/{name}/{version}")[0]
            if not described.get("jobQueueStatus", {}).get("pendingRequests", 0):
                break
            time.sleep(0.1)
        time.sleep(DRAIN_S)


def archived_versions(store: Path, name: str) -> list[str]:
    prefix = f"{name}-"
    found = [p.name[len(prefix):-len(".mar")] for p in (store / VERSIONS_DIR).glob(f"{prefix}*.mar")]
    return sorted(found, key=version_key)


def switch_to(cfg: Config, model_store: Path, workdir: Path, version: str) -> int:
    """Make ``version`` the served default of the running server and of the store; returns an exit code."""
    store = Path(model_store).resolve()
    names = model_names(store)
    name = cfg.model_name if cfg.model_name in names or len(names) != 1 else names[0]
    mar = versioned_mar(store, name, version)
    if not mar.is_file():
        kept = ", ".join(archived_versions(store, name)) or "none"
        raise JobError(f"{mar} does not exist (versions of {name} archived in {store / VERSIONS_DIR}: {kept}); "
                       "pick one of them")
    if _alive(_pid(workdir / KServeRuntime.PID_FILE)):
        return switch_kserve(cfg, store, workdir, name, version, model_store)
    if not (workdir / "config.properties").is_file():  # no server: the store's default alone changes
        link_or_copy(mar, store / f"{name}.mar")
        print(f"serve: {name} {version} is the default of {shown_path(store)} (no server running in "
              f"{shown_path(workdir)})")
        return 0
    api = Management(workdir, store)
    registered, serving = api.versions(name), api.default(name)
    if serving == version:
        link_or_copy(mar, store / f"{name}.mar")
        print(f"serve: {name} {version} is already the default")
        return 0
    plan = scheduler.serving_plan()
    link_or_copy(mar, store / f"{name}.mar")  # TorchServe registers only files directly in the store
    try:
        if version not in registered:
            api.call("POST", "/models", timeout=cfg.startup_timeout + TIMEOUT_S, url=f"{name}.mar",
                     initial_workers=plan.workers, batch_size=plan.batch_size,
                     max_batch_delay=plan.max_batch_delay_ms, synchronous="true")
        api.call("PUT", f"/models/{name}/{version}/set-default")
    except BaseException:
        link_or_copy(versioned_mar(store, name, serving), store / f"{name}.mar")  # the store's default as served
        raise
    others = [v for v in registered if v != version]
    for old in others:
        api.drain(name, old)
        api.call("DELETE", f"/models/{name}/{old}", timeout=cfg.response_timeout + TIMEOUT_S)
    print(f"serve: {name} {version} is the default now (was {serving}; unregistered {', '.join(others)}); "
          f"back with `{jobs_command()} serve --model-store {model_store} --switch-to {serving}`")
    return 0


# -- KServe's model server (handler/kserve_runtime.py) ------------------------------------------------------------

POLL_S = 0.2


def _pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]  # handler.kserve_runtime.archive_identity


def _running(doc: dict) -> bool:
    """The process a status file names still runs: its pid is alive and started when the file says (a file
    from before ``started`` was recorded goes by its pid alone)."""
    return _alive(doc.get("pid")) and doc.get("started") in (None, process_start(doc["pid"]))


def serving_processes(workdir: Path, name: str) -> list[dict]:
    """The status files of the runtime's live serving processes for ``name`` (``ClassifierModel.report``)."""
    found = []
    for path in (workdir / STATUS_DIR).glob(f"{name}.*.json"):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            if doc.get("model") == name and _running(doc):
                found.append(doc)
    return found


def switch_kserve(cfg: Config, store: Path, workdir: Path, name: str, version: str, shown_store: Path) -> int:
    """Link ``version``'s archive as the store's ``<name>.mar``; every worker process of the running KServe
    runtime notices, loads it beside the version it serves and swaps (handler/kserve_runtime.py,
    ``ClassifierModel.watch``). Wait until they all serve it; if one cannot load it, link the old archive back
    (they keep or go back to it) and say why."""
    log = shown_path(workdir / KServeRuntime.LOGS[0])
    default = store / f"{name}.mar"
    before = serving_processes(workdir, name)
    versions = sorted({p["version"] for p in before}, key=version_key)
    serving = versions[-1] if len(versions) == 1 else packed_settings(default)[0]["modelVersion"]
    previous_mar = versioned_mar(store, name, serving)
    link_or_copy(versioned_mar(store, name, version), default)
    wanted = _identity(default)
    timeout = cfg.startup_timeout + TIMEOUT_S
    deadline = time.monotonic() + timeout
    while True:
        live = serving_processes(workdir, name)
        workers = max([p.get("workers", 1) for p in live] or [1])
        failed = next((p for p in live if p.get("failed_archive") == wanted), None)
        done = [p for p in live if p.get("archive") == wanted]
        if failed is None and len(done) >= workers and len(done) == len(live):
            break
        if failed is not None or time.monotonic() > deadline:
            why = (f"could not load {name} {version} ({failed.get('error')})" if failed is not None else
                   f"did not serve {name} {version} within {timeout:.0f} s ({len(done)} of {workers} worker "
                   "processes did)")
            if serving != version and previous_mar.is_file():
                link_or_copy(previous_mar, default)  # the processes that did switch go back to it
                raise JobError(f"KServe's model server {why}; {serving} stays the default and serves; see {log}")
            raise JobError(f"KServe's model server {why}; see {log}")
        time.sleep(POLL_S)
    if serving == version:
        print(f"serve: {name} {version} is already the default")
        return 0
    print(f"serve: {name} {version} is the default now in KServe's model server (was {serving}; "
          f"{len(done)} worker processes reloaded); back with "
          f"`{jobs_command()} serve --model-store {shown_store} --switch-to {serving}`")
    return 0
