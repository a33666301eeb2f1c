"""Serve a model store with a local TorchServe (no Docker): ``python -m jobs serve --model-store DIR``.

TorchServe writes its logs, key_file.json, the unpacked archives and the worker sockets into its
working directory and temp folder; both live in a state folder (default ``<model-store>/../serve-state``)
so the repository stays clean and several servers can run side by side (tests, bench) without
sharing ``/tmp/.ts.sock.9000`` or the pid file that ``torchserve --stop`` reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import requests
import torch

from handler import cpus, scheduler
from handler.capture import CaptureSettings, off_environ
from jobs.archive import handler_dir, packed_settings
from jobs.config import Config
from jobs.errors import JobError, jobs_command, shown_path, shown_program
from jobs.fileio import atomic_write_text, ensure_writable_dir

# The hardened server settings every TorchServe of ours starts from, and the handler's metrics they expose.
SERVER_CONFIG = handler_dir() / "config.properties"
HANDLER_METRICS = handler_dir() / "metrics.yaml"


@dataclass(frozen=True)
class Ports:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` ports unused right now on ``host``."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def render_config(base: str, *, host: str, ports: Ports, model_store: Path, disable_token_auth: bool = False,
                  models: dict | None = None, metrics_config: Path | None = None) -> str:
    """``handler/config.properties`` with addresses, ports and model store replaced.

    Management and gRPC stay on 127.0.0.1 whatever ``host`` is: only inference and metrics follow it.
    ``models`` (TorchServe's per-model settings, see ``machine_models``) sets what the archives leave open;
    ``metrics_config`` names the metrics Prometheus mode exposes (``handler/metrics.yaml``).
    """
    store = Path(model_store).resolve()
    values = {
        "inference_address": f"http://{host}:{ports.inference}",
        "management_address": f"http://127.0.0.1:{ports.management}",
        "metrics_address": f"http://{host}:{ports.metrics}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_management_address": "127.0.0.1",
        "grpc_inference_port": str(ports.grpc_inference),
        "grpc_management_port": str(ports.grpc_management),
        "model_store": str(store),
        "allowed_urls": "file://" + re.escape(str(store)).replace("\\", "\\\\") + "/.*\\\\.mar",
        # `jobs serve --switch-to` registers and unregisters versions (jobs/switch.py); the management API it
        # needs stays on 127.0.0.1 and, with token authorization, takes the management token only.
        "enable_model_api": "true",
        **({"disable_token_authorization": "true"} if disable_token_auth else {}),
        **({"models": json.dumps(models, separators=(",", ":"))} if models else {}),
        **({"metrics_config": str(metrics_config)} if metrics_config else {}),
    }
    return with_settings(base, values)


def with_settings(base: str, values: dict[str, str]) -> str:
    """``base`` (config.properties text) with each key of ``values`` set: in place where the key is,
    appended where it is not; comments and the other lines stay as they are."""
    lines, seen = [], set()
    for line in base.splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and "=" in line and key in values:
            line, _ = f"{key}={values[key]}", seen.add(key)
        lines.append(line)
    lines += [f"{k}={v}" for k, v in values.items() if k not in seen]
    return "\n".join(lines) + "\n"


def machine_config(base: str, model_store: Path, plan: scheduler.ServingPlan) -> tuple[str, dict]:
    """(``base`` with this machine's ``models`` and the handler's ``metrics_config``, those models).

    For a TorchServe started by someone else (the serve container): ``base`` keeps every setting it
    has, and a ``models`` or ``metrics_config`` it sets itself wins over the machine's.
    """
    settings = parse_properties(base)
    models = {} if "models" in settings else machine_models(model_store, plan)
    values = {**({"models": json.dumps(models, separators=(",", ":"))} if models else {}),
              **({} if "metrics_config" in settings else {"metrics_config": str(HANDLER_METRICS)})}
    return with_settings(base, values), models


def write_machine_config(base_file: Path | None, model_store: Path, dest: Path) -> Path:
    """``jobs serve-config``: write ``machine_config`` of ``base_file`` (default ``SERVER_CONFIG``) to ``dest``;
    prints what it chose."""
    base_file = base_file or SERVER_CONFIG
    try:
        base = Path(base_file).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"cannot read the TorchServe config {base_file} ({type(e).__name__}); "
                       "pass --base with a readable config.properties") from None
    plan = scheduler.serving_plan()
    text, models = machine_config(base, model_store, plan)
    atomic_write_text(dest, text)
    print(f"serve-config: {dest}: {tuning_line(plan, models)}", flush=True)
    return dest


def tuning_line(plan: scheduler.ServingPlan, models: dict) -> str:
    tuned = ", ".join(models) or "none (the config or the archives set their own)"
    return (f"{plan.workers} workers x {plan.threads} threads ({plan.solo_threads} for a lone image), batchSize "
            f"{plan.batch_size}, maxBatchDelay {plan.max_batch_delay_ms} ms for this machine (CPUs "
            f"{cpus.usable_cpus()}, GPUs {torch.cuda.device_count()}): {tuned}")


def machine_models(model_store: Path, plan: scheduler.ServingPlan | None = None) -> dict:
    """TorchServe's ``models`` setting for the archives in ``model_store`` that leave workers and batching
    to the server (``serve_tuning: machine``): chosen for this machine (``scheduler.serving_plan``).
    An archive that packs them keeps its own: TorchServe lets the packed value win."""
    plan = plan or scheduler.serving_plan()
    models = {}
    for mar in sorted(Path(model_store).glob("*.mar")):
        manifest, packed = packed_settings(mar)
        if "batchSize" in packed:
            continue
        timeouts = {k: packed[k] for k in ("responseTimeout", "startupTimeout") if k in packed}
        models[manifest["modelName"]] = {manifest.get("modelVersion", "1.0"): {
            "defaultVersion": True, "marName": mar.name, **plan.model_settings(), **timeouts}}
    return models


def parse_properties(text: str) -> dict[str, str]:
    """``key=value`` lines of a TorchServe config.properties; comments and blank lines skipped."""
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


@dataclass
class Server:
    """A model server we started, in its own process group and state folder, with TorchServe's key file."""

    process: subprocess.Popen
    workdir: Path
    host: str

    NAME = "the server"
    LOGS: ClassVar[tuple[str, ...]] = ()

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    def keys(self) -> dict[str, str]:
        """{"inference": ..., "management": ...} bearer tokens; empty when token authorization is off."""
        if not self.key_file.exists():
            return {}
        data = json.loads(self.key_file.read_text())
        return {kind: data[kind]["key"] for kind in ("inference", "management") if kind in data}

    def auth(self, kind: str = "inference") -> dict[str, str]:
        key = self.keys().get(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def wait_ready(self, models: list[str], timeout: float = 180.0) -> None:
        """Until every model answers ready; JobError with the log tail if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise JobError(f"{self.NAME} exited with code {self.process.returncode}\n{self.log_tail()}")
            if self._ready(models):
                return
            time.sleep(0.5)
        raise JobError(f"{self.NAME} not ready after {timeout:.0f}s\n{self.log_tail()}")

    def _ready(self, models: list[str]) -> bool:
        raise NotImplementedError

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for name in self.LOGS:
            path = self.workdir / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts) or f"(no logs in {self.workdir})"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the whole process group (frontend and workers), SIGKILL what is left after ``timeout``."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # workers that outlived the frontend
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.returncode


@dataclass
class TorchServe(Server):
    """A running TorchServe in its own process group and state folder."""

    ports: Ports

    NAME = "TorchServe"
    LOGS = ("logs/model_log.log", "logs/ts_log.log", "torchserve.out")

    @property
    def inference_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.ports.inference}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.management}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.ports.metrics}"

    def _ready(self, models: list[str]) -> bool:
        """/ping is healthy and every model has a READY worker."""
        try:
            ping = requests.get(f"{self.inference_url}/ping", headers=self.auth(), timeout=5)
            if ping.status_code != 200 or ping.json().get("status") != "Healthy":
                return False
            for name in models:
                r = requests.get(f"{self.management_url}/models/{name}", headers=self.auth("management"), timeout=5)
                workers = r.json()[0].get("workers", []) if r.status_code == 200 else []
                if not any(w.get("status") == "READY" for w in workers):
                    return False
            return True
        except (requests.RequestException, ValueError, KeyError, IndexError):
            return False


@dataclass
class KServeRuntime(Server):
    """KServe's model server on the same archives (handler/kserve_runtime.py): one port for everything."""

    port: int

    NAME = "KServe's model server"
    LOGS = ("kserve.out",)
    PID_FILE = "kserve.pid"

    @property
    def inference_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

    metrics_url = inference_url

    def _ready(self, models: list[str]) -> bool:
        try:
            return requests.get(f"{self.inference_url}/ping", timeout=5).status_code == 200 and all(
                requests.get(f"{self.inference_url}/v2/models/{name}/ready", headers=self.auth(),
                             timeout=5).status_code == 200 for name in models)
        except requests.RequestException:
            return False


RUNTIMES = ("torchserve", "kserve")


def start_kserve(model_store: Path, workdir: Path, *, host: str = "127.0.0.1", port: int = 8080,
                 disable_token_auth: bool = False, python: str | None = None,
                 environ: dict[str, str] | None = None) -> KServeRuntime:
    """Start ``python -m handler.kserve_runtime`` on ``model_store`` in its own session; returns at once.

    ``python``: another interpreter with KServe installed (bench/serve.py measures one per runtime);
    the serving package it runs is this checkout's; ``environ`` as ``start``'s. Output goes to ``workdir/kserve.out``.
    """
    model_store = Path(model_store).resolve()
    if not model_names(model_store):
        raise JobError(f"no .mar archive in {model_store}; run `python -m jobs archive --out RUN` first")
    python = python or sys.executable
    check = subprocess.run([python, "-c", "import kserve"], capture_output=True, check=False)
    if check.returncode:
        raise JobError(f"{python} cannot import kserve: pip install -e '.[kserve]' (pyproject.toml's kserve extra)")
    workdir = ensure_writable_dir(Path(workdir).resolve())
    _check_port_free(host, port)
    cmd = [python, "-m", "handler.kserve_runtime", "--model-store", str(model_store), "--host", host,
           "--port", str(port), "--workdir", str(workdir), *(["--disable-token-auth"] if disable_token_auth else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(handler_dir().parent),
                                                        *filter(None, [os.environ.get("PYTHONPATH")])]),
           **(environ or {})}
    with open(workdir / "kserve.out", "ab") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    atomic_write_text(workdir / KServeRuntime.PID_FILE, f"{proc.pid}\n")
    return KServeRuntime(proc, workdir, host, port)


def capture_environ(cfg: Config) -> dict[str, str]:
    """The capture settings of ``cfg`` as the environment the handler reads (``handler.capture``); capture off
    unless ``cfg.capture`` names a folder, whatever this process's environment says."""
    if not cfg.capture:
        return off_environ()
    settings = CaptureSettings(Path(cfg.capture).resolve(), cfg.capture_below, cfg.capture_sample, cfg.capture_max_mb,
                               cfg.capture_max_files)
    return settings.environ()


def capture_line(cfg: Config) -> str:
    if not cfg.capture:
        return ""
    return (f"\ncapture: abstained, under {cfg.capture_below} and {cfg.capture_sample:.1%} of the rest into "
            f"{shown_path(Path(cfg.capture).resolve())} (at most {cfg.capture_max_mb:g} MiB, "
            f"{cfg.capture_max_files} files)")


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in {"0.0.0.0", ""} else host


# A Unix socket's name holds at most 107 bytes; TorchServe names its workers' <tmp>/.ts.sock.<port>.
UNIX_SOCKET_NAME_MAX = 107


def server_tmp(workdir: Path) -> Path:
    """TorchServe's temp folder for ``workdir``: its worker sockets, unpacked archives and pid file.

    ``workdir/tmp``, unless a socket name there would be too long (a deep run folder: every worker then dies
    with "AF_UNIX path too long" and the server is never ready); then a short folder named after ``workdir``
    in the system's temp folder, the same one every time, so that ``serve --stop`` finds the pid file."""
    tmp = Path(workdir).resolve() / "tmp"
    if len(os.fsencode(tmp / ".ts.sock.65535")) > UNIX_SOCKET_NAME_MAX:
        tmp = Path(tempfile.gettempdir()) / f"jobs-ts-{hashlib.sha256(os.fsencode(tmp)).hexdigest()[:16]}"
    return tmp


def _state_env(workdir: Path) -> dict[str, str]:
    # TEMP -> the JVM's java.io.tmpdir (unpacked .mar files, worker sockets);
    # TMPDIR -> where `torchserve` keeps .model_server.pid for --stop.
    tmp = server_tmp(workdir)
    tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
    return {**os.environ, "TEMP": str(tmp), "TMPDIR": str(tmp)}


def _torchserve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ts.model_server", *args]


def start(model_store: Path, workdir: Path, *, host: str = "127.0.0.1", ports: Ports = Ports(),
          disable_token_auth: bool = False, models: dict | None = None,
          environ: dict[str, str] | None = None) -> TorchServe:
    """Start TorchServe on ``model_store`` with ``handler/config.properties`` adapted; returns at once.

    ``models`` sets the workers/batching the archives leave open (``machine_models``); None: TorchServe's defaults.
    ``environ``: variables for the server and its workers besides this process's (``capture_environ``).
    It runs in its own session (process group): ``TorchServe.stop`` ends frontend and workers together,
    and a server not stopped outlives this process until ``serve --stop``.
    Its console output goes to ``workdir/torchserve.out``, its logs to ``workdir/logs/``.
    """
    model_store = Path(model_store).resolve()
    if not model_names(model_store):
        raise JobError(f"no .mar archive in {model_store}; run `python -m jobs archive --out RUN` first")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise JobError("TorchServe needs Java 17+: apt-get install openjdk-17-jre-headless, or set JAVA_HOME")
    workdir = ensure_writable_dir(Path(workdir).resolve())
    for port in (ports.inference, ports.management, ports.metrics, ports.grpc_inference, ports.grpc_management):
        _check_port_free(host if port in (ports.inference, ports.metrics) else "127.0.0.1", port)
    config = workdir / "config.properties"
    atomic_write_text(config, render_config(SERVER_CONFIG.read_text(), host=host, ports=ports,
                                            model_store=model_store, disable_token_auth=disable_token_auth,
                                            models=models, metrics_config=HANDLER_METRICS))
    cmd = _torchserve_cmd("--start", "--foreground", "--ncs", "--model-store", str(model_store),
                          "--ts-config", str(config), "--models", "all")
    with open(workdir / "torchserve.out", "ab") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env={**_state_env(workdir), **(environ or {})}, stdout=out,
                                stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
    return TorchServe(proc, workdir, host, ports)


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise JobError(f"cannot listen on {host}:{port} ({e.strerror}); stop what uses it or pick other ports "
                           f"(--port/--management-port/--metrics-port)") from None


def model_names(model_store: Path) -> list[str]:
    return sorted(p.stem for p in Path(model_store).glob("*.mar"))


def curl_hint(server: Server, model_name: str) -> str:
    url = f"{server.inference_url}/predictions/{model_name}"
    if not server.key_file.exists():
        return f"curl -T image.jpg {url}"
    read_key = f"import json; print(json.load(open('{shown_path(server.key_file)}'))['inference']['key'])"
    token = f'{shown_program(sys.executable)} -c "{read_key}"'
    return f'TOKEN=$({token})\ncurl -H "Authorization: Bearer $TOKEN" -T image.jpg {url}'


def default_workdir(model_store: Path) -> Path:
    return Path(model_store).resolve().parent / "serve-state"


def serve(cfg: Config, model_store: Path, *, stop: bool = False, detach: bool = False, workdir: Path | None = None,
          host: str = "127.0.0.1", port: int = 8080, management_port: int = 8081, metrics_port: int = 8082,
          disable_token_auth: bool = False, runtime: str = "torchserve") -> int:
    """Run ``runtime`` (TorchServe, or KServe's model server: docs/serving-runtimes.md) on ``model_store`` until
    Ctrl-C/SIGTERM (``detach``: leave it running once it answers), or stop the one running; returns an exit code."""
    workdir = Path(workdir) if workdir else default_workdir(model_store)
    if stop:
        return _stop(workdir, model_store)
    if runtime == "kserve":
        server: Server = launch_kserve(cfg, model_store, workdir, host=host, port=port,
                                       disable_token_auth=disable_token_auth)
    else:
        server = launch(cfg, model_store, workdir, host=host, port=port, management_port=management_port,
                        metrics_port=metrics_port, disable_token_auth=disable_token_auth)
    if detach:  # the server runs in its own session: it outlives this process
        print(f"serve: running in the background (pid {server.process.pid}); stop it with "
              f"`{jobs_command()} serve --model-store {model_store} --stop`", flush=True)
        return 0
    try:
        print("Ctrl-C stops it", flush=True)
        # `docker stop`/systemd send SIGTERM: leave through the cleanup below, not past it.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        return server.process.wait()
    except KeyboardInterrupt:
        return server.stop()
    except BaseException:
        server.stop()
        raise


def launch(cfg: Config, model_store: Path, workdir: Path, *, host: str, port: int, management_port: int,
           metrics_port: int, disable_token_auth: bool) -> TorchServe:
    """Start TorchServe with workers and batching for this machine (where the archives leave them open);
    returns once it is ready."""
    # gRPC is unused here but TorchServe always opens it: any two free loopback ports do.
    ports = Ports(port, management_port, metrics_port, *free_ports(2))
    plan = scheduler.serving_plan()
    models = machine_models(model_store, plan)
    server = start(model_store, workdir, host=host, ports=ports, disable_token_auth=disable_token_auth, models=models,
                   environ=capture_environ(cfg))
    try:
        names = model_names(model_store)
        server.wait_ready(names, cfg.startup_timeout + 60)  # + the JVM's own start
    except BaseException:
        server.stop()
        raise
    hint = curl_hint(server, cfg.model_name if cfg.model_name in names else names[0])
    print(f"serving {', '.join(names)} from {shown_path(Path(model_store).resolve())}, {tuning_line(plan, models)}\n"
          f"logs and key_file.json: {shown_path(server.workdir)}{capture_line(cfg)}\n{hint}", flush=True)
    return server


def launch_kserve(cfg: Config, model_store: Path, workdir: Path, *, host: str, port: int,
                  disable_token_auth: bool) -> KServeRuntime:
    """Start KServe's model server (workers and batching: the same plan as TorchServe's); returns once it is ready."""
    plan = scheduler.serving_plan()
    server = start_kserve(model_store, workdir, host=host, port=port, disable_token_auth=disable_token_auth,
                          environ=capture_environ(cfg))
    try:
        names = model_names(model_store)
        server.wait_ready(names, cfg.startup_timeout + 60)
    except BaseException:
        server.stop()
        raise
    print(f"serving {', '.join(names)} from {Path(model_store).resolve()} with KServe's model server (V1, V2 and "
          f"/predictions), {plan.workers} workers x {plan.threads} threads, batch {plan.batch_size}\n"
          f"logs and key_file.json: {server.workdir}{capture_line(cfg)}\n"
          f"{curl_hint(server, cfg.model_name if cfg.model_name in names else names[0])}", flush=True)
    return server


def _stop(workdir: Path, model_store: Path) -> int:
    """Stop the server of ``model_store``: KServe's model server (its process group), or ``torchserve --stop`` in
    the server's state folder (where its pid file is); says what happened."""
    pid_file = workdir / KServeRuntime.PID_FILE
    if pid_file.is_file():
        pid = int(pid_file.read_text())
        pid_file.unlink()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
            time.sleep(2)
            os.killpg(pid, signal.SIGKILL)
        print(f"serve: stopped KServe's model server serving {model_store}")
        return 0
    if not server_tmp(workdir).exists():
        print(f"serve: no TorchServe state in {shown_path(workdir)}; nothing to stop")
        return 0
    done = subprocess.run(_torchserve_cmd("--stop", "--foreground"), cwd=workdir, env=_state_env(workdir),
                          capture_output=True, text=True, check=False)
    said = " ".join((done.stdout + done.stderr).split())  # TorchServe is silent when it stopped one
    if done.returncode == 0 and not said:
        print(f"serve: stopped the TorchServe serving {model_store} (logs stay in {shown_path(workdir)})")
    else:
        print(f"serve: {model_store}: {said or f'torchserve --stop exited with {done.returncode}'}")
    return done.returncode
