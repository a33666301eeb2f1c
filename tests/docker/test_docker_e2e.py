"""The containers end to end, with a real Docker engine and Docker Compose v2.

Builds both images with ``docker compose build``, trains on real photos with
``docker compose run train``, serves the resulting .mar with ``docker compose up serve`` and
classifies a JPEG over HTTP with the token from the container's key_file.json.

Compose runs in a temporary copy of the project (its own ``-p`` name), so the bind mounts
./data, ./runs and ./model-store are temporary folders; ``down -v`` runs even on failure.
The images keep fixed tags and Docker's build cache, so a rerun skips the builds.

This sandbox has no container registry and no bridge network: the base image is debootstrapped
(make_base_image.sh), builds and containers use host networking (compose.test.yml), and pip
takes torch from the machine's local package indexes, served on loopback, when they exist.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from torchserve_fixture import unused_ports

from handler import scheduler
from jobs.serve import Ports, render_config

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FIXTURE_IMAGES = REPO / "tests" / "fixtures" / "hymenoptera_small"
BASE_IMAGE = os.environ.get("DOCKER_E2E_BASE_IMAGE", "local/python:3.11-bookworm")
# Local PEP 503 indexes of this machine (relative file links, so one server for their parent works).
LOCAL_INDEXES = (Path("/opt/pypi"), Path("/opt/pypi-more"))
# Fixed, because the index URL is a build arg and so part of Docker's cache key for the torch layer.
INDEX_PORT = 41753
PROJECT_FILES = ("Dockerfile.train", "Dockerfile.serve", "docker-compose.yml", "docker-compose.gpu.yml",
                 ".dockerignore", "pyproject.toml", "README.md", "jobs", "handler")
IMAGES_PER_CLASS = 10
IMAGE_TITLES = ("jobs-train", "jobs-serve")  # LABELs of the two Dockerfiles
MODEL_NAME = "classifier"


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None, check: bool = True,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def docker_engine() -> None:
    if os.geteuid() != 0 and shutil.which("docker") is None:
        pytest.skip("needs root (to install and start Docker) or a working docker CLI")
    run(["bash", str(HERE / "ensure_docker.sh")], timeout=900)


@pytest.fixture(scope="module")
def base_image(docker_engine: None) -> str:
    if "DOCKER_E2E_BASE_IMAGE" not in os.environ:
        run(["bash", str(HERE / "make_base_image.sh"), BASE_IMAGE], timeout=900)
    return BASE_IMAGE


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def pip_extra_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Extra index URLs for the builds: the local indexes over loopback HTTP, or '' (PyPI only).

    pip prefers the last index on a tie, so with these as extras the torch wheels come from
    here and only what they lack comes from PyPI.
    """
    roots = [p for p in LOCAL_INDEXES if (p / "simple").is_dir()]
    if not roots:
        yield ""
        return
    top = tmp_path_factory.mktemp("pip-index")
    for root in roots:
        (top / root.name).symlink_to(root)
    handler = functools.partial(_QuietHandler, directory=str(top))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", INDEX_PORT), handler)
    except OSError:  # taken (another run): still correct, but the torch layer is built anew
        print(f"port {INDEX_PORT} is taken: serving the package index on another port (no build cache hit)")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        yield " ".join(f"http://127.0.0.1:{port}/{root.name}/simple" for root in roots)
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Project:
    """A throwaway compose project: a copy of the repo's container files plus its bind-mount folders."""

    dir: Path
    name: str
    env: dict[str, str]
    ports: Ports

    def compose(self, *args: str, timeout: float = 600, check: bool = True,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        cmd = ["docker", "compose", "-p", self.name, "--project-directory", str(self.dir),
               "-f", str(self.dir / "docker-compose.yml"), "-f", str(self.dir / "compose.test.yml"), *args]
        return run(cmd, timeout=timeout, env={**self.env, **(env or {})}, check=check)

    def container_id(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()


def copy_sources(dest: Path) -> None:
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    shutil.copy2(HERE / "compose.test.yml", dest / "compose.test.yml")


def copy_photos(dest: Path) -> None:
    source = FIXTURE_IMAGES if FIXTURE_IMAGES.is_dir() else REPO.parent / "shared/datasets/hymenoptera/train"
    for cls in ("ants", "bees"):
        (dest / cls).mkdir(parents=True)
        for photo in sorted((source / cls).glob("*.jpg"))[:IMAGES_PER_CLASS]:
            shutil.copy2(photo, dest / cls / photo.name)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, base_image: str, pip_extra_index: str) -> Iterator[Project]:
    root = tmp_path_factory.mktemp("compose")
    copy_sources(root)
    copy_photos(root / "data" / "hymenoptera")
    for mount in ("runs", "model-store"):
        (root / mount).mkdir()
        (root / mount).chmod(0o777)  # the containers write as uid 1000
    # The containers share the host's network: every listener moves to a free loopback port, since
    # 8080-8082 and the gRPC 7070/7071 could be taken by other TorchServe instances on this machine.
    ports = unused_ports()
    (root / "ts-test.properties").write_text(render_config((root / "handler" / "config.properties").read_text(),
                                                           host="127.0.0.1", ports=ports,
                                                           model_store=Path("/model-store")))
    env = {**os.environ, "BASE_IMAGE": base_image, "PREFETCH_WEIGHTS": "0", "PIP_EXTRA_INDEX_URL": pip_extra_index}
    env.pop("TS_DISABLE_TOKEN_AUTHORIZATION", None)
    proj = Project(dir=root, name=f"e2e-{uuid.uuid4().hex[:8]}", env=env, ports=ports)
    try:
        yield proj
    finally:
        proj.compose("down", "-v", "--remove-orphans", "--timeout", "20", timeout=180, check=False)
        # Rebuilds after code changes leave the previous images untagged; the build cache stays.
        for title in IMAGE_TITLES:
            run(["docker", "image", "prune", "-f", "--filter", f"label=org.opencontainers.image.title={title}"],
                timeout=120, check=False)


@pytest.fixture(scope="module")
def built(project: Project) -> Project:
    started = time.monotonic()
    project.compose("build", timeout=1800)
    print(f"docker compose build: {time.monotonic() - started:.0f} s")
    return project


@pytest.fixture(scope="module")
def trained(built: Project) -> Project:
    built.compose("run", "--rm", "-T", "train", "--data", "/data/hymenoptera", "--weights", "none",
                  "--epochs", "2", "--batch-size", "8", "--num-workers", "0", "--model-name", MODEL_NAME,
                  timeout=900)
    return built


def wait_healthy(project: Project, container: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        state = json.loads(run(["docker", "inspect", "--format", "{{json .State}}", container], timeout=30).stdout)
        status = state.get("Health", {}).get("Status", "")
        if status == "healthy":
            return
        if not state.get("Running"):
            break
        time.sleep(3)
    logs = project.compose("logs", "--no-color", "--tail", "80", "serve", check=False).stdout
    raise AssertionError(f"serve container not healthy (status {status!r})\n{logs}")


def start_serve(project: Project, env: dict[str, str] | None = None) -> Project:
    """`up -d serve` (compose recreates the container when its settings changed) and wait for healthy."""
    project.compose("up", "-d", "serve", timeout=300, env=env)
    wait_healthy(project, project.container_id("serve"))
    return project


@pytest.fixture(scope="module")
def serving(trained: Project) -> Project:
    return start_serve(trained)


def inference_key(project: Project) -> str:
    keys = json.loads(project.compose("exec", "-T", "serve", "cat", "key_file.json").stdout)
    return keys["inference"]["key"]


def post_image(project: Project, image: Path, key: str | None) -> tuple[int, bytes]:
    headers = {"Content-Type": "image/jpeg", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{project.ports.inference}/predictions/{MODEL_NAME}",
                                     data=image.read_bytes(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def a_photo(project: Project, cls: str) -> Path:
    return next((project.dir / "data" / "hymenoptera" / cls).glob("*.jpg"))


def test_train_job_writes_the_model_archive(trained: Project) -> None:
    archive = trained.dir / "model-store" / f"{MODEL_NAME}.mar"
    assert archive.is_file() and archive.stat().st_size > 1_000_000
    assert (trained.dir / "runs" / "latest" / "model" / "index_to_name.json").is_file()


def test_train_entrypoint_runs_other_job_commands(trained: Project) -> None:
    photo = a_photo(trained, "bees")
    out = trained.compose("run", "--rm", "-T", "train", "predict", "--model-dir", "/runs/latest/model",
                          f"/data/hymenoptera/bees/{photo.name}", timeout=300).stdout
    assert re.search(r"\b(ants|bees)\b", out), out


def test_serve_classifies_a_jpeg(serving: Project) -> None:
    status, body = post_image(serving, a_photo(serving, "ants"), inference_key(serving))
    assert status == 200, body
    predictions = json.loads(body)["predictions"]
    assert {p["label"] for p in predictions} <= {"ants", "bees"} and predictions
    for p in predictions:
        assert isinstance(p["index"], int) and 0.0 <= p["probability"] <= 1.0
    assert [p["probability"] for p in predictions] == sorted((p["probability"] for p in predictions), reverse=True)


def test_serve_refuses_requests_without_the_token(serving: Project) -> None:
    status, body = post_image(serving, a_photo(serving, "bees"), key=None)
    # TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException.
    assert status == 400 and json.loads(body)["type"] == "InvalidKeyException", body


def test_containers_run_as_non_root(serving: Project) -> None:
    assert serving.compose("exec", "-T", "serve", "id", "-u").stdout.strip() != "0"
    train_uid = serving.compose("run", "--rm", "-T", "--entrypoint", "id", "train", "-u").stdout.strip()
    assert train_uid != "0"


def test_serve_metrics_answer_in_prometheus_format(serving: Project) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{serving.ports.metrics}/metrics", timeout=30) as response:
        text = response.read().decode()
    assert "# TYPE" in text


def test_serve_container_plans_for_its_cpu_limit_and_reports_handler_metrics(serving: Project) -> None:
    """compose.test.yml gives the serve container one CPU, a cgroup quota on a bigger host: its entry point
    (handler/start_torchserve.sh -> jobs serve-config) starts the one-CPU plan, and the handler's own
    PreprocessTime reaches Prometheus through handler/metrics.yaml."""
    keys = json.loads(serving.compose("exec", "-T", "serve", "cat", "key_file.json").stdout)
    request = urllib.request.Request(f"http://127.0.0.1:{serving.ports.management}/models/{MODEL_NAME}",
                                     headers={"Authorization": f"Bearer {keys['management']['key']}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        model = json.loads(response.read())[0]
    plan = scheduler.serving_plan(cores=1, gpus=0)
    assert (len(model["workers"]), model["batchSize"], model["maxBatchDelay"]) == \
        (plan.workers, plan.batch_size, plan.max_batch_delay_ms), model
    logs = serving.compose("logs", "--no-color", "serve").stdout
    assert re.search(r"serve-config: .*\(CPUs 1, GPUs 0\): classifier", logs), logs[-3000:]
    status, body = post_image(serving, a_photo(serving, "bees"), inference_key(serving))
    assert status == 200, body
    with urllib.request.urlopen(f"http://127.0.0.1:{serving.ports.metrics}/metrics", timeout=30) as response:
        text = response.read().decode()
    assert re.search(rf'^PreprocessTime\{{.*ModelName="{MODEL_NAME}".*\}} \S+$', text, re.M), text[:3000]


# Last: it recreates the serve container with the demo switch on.
def test_demo_switch_turns_token_auth_off(trained: Project) -> None:
    project = start_serve(trained, env={"TS_DISABLE_TOKEN_AUTHORIZATION": "true"})
    status, body = post_image(project, a_photo(project, "bees"), key=None)
    assert status == 200, body
    assert json.loads(body)["predictions"]


def test_serve_stops_on_sigterm_without_being_killed(serving: Project) -> None:
    container = serving.container_id("serve")
    serving.compose("stop", "--timeout", "60", "serve", timeout=120)
    state = json.loads(run(["docker", "inspect", "--format", "{{json .State}}", container], timeout=30).stdout)
    # 137 = SIGKILL after the timeout: TorchServe would have ignored `docker stop`.
    assert not state["Running"] and state["ExitCode"] != 137 and not state["OOMKilled"], state
