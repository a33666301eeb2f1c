"""deploy/: every manifest against the Kubernetes schema, the cross-references no schema sees, and the
KServe layout and the serving probe against a real TorchServe.

Core resources are checked with kubernetes-validate (the upstream OpenAPI schemas, shipped in the
package; strict: unknown fields fail). The custom resources (PyTorchJob, InferenceService) have no
schema there: their embedded pod templates are validated as core PodTemplates, the rest field by field.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml
from conftest import FIXTURE_IMAGES
from conftest import REPO as ROOT
from torchserve_fixture import export_random_model, unused_ports

from handler import scheduler
from jobs import serve
from jobs.archive import archive
from jobs.config import Config, RunPaths, load_config
from jobs.errors import JobError
from jobs.kserve import MOUNT, PORTS, export_kserve

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PHOTO = sorted(FIXTURE_IMAGES.glob("*/*.jpg"))[0]
# The oldest Kubernetes these manifests promise to work on, and the newest schema the package ships.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CUSTOM_KINDS = {"PyTorchJob", "InferenceService"}
KUSTOMIZATIONS = [K8S, DEPLOY / "overlays" / "gpu-serve"]
TRAIN_IMAGE, SERVE_IMAGE = "jobs-train:latest", "jobs-serve:latest"


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# Resource files: everything under deploy/ except kustomize's own files (a patch is not a resource).
MANIFESTS = {p: _load(p) for p in sorted(DEPLOY.rglob("*.yaml"))
             if p.name != "kustomization.yaml" and p.parent.name != "gpu-serve"}
DOCS = [(p, d) for p, docs in MANIFESTS.items() for d in docs]


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _doc_id(item: tuple[Path, dict]) -> str:
    path, doc = item
    return f"{path.relative_to(DEPLOY)}:{doc['kind']}/{doc['metadata']['name']}"


# ----------------------------------------------------------------------------------------------
# schemas


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("item", [i for i in DOCS if i[1]["kind"] not in CUSTOM_KINDS], ids=_doc_id)
def test_core_resources_pass_the_kubernetes_schema(item, version):
    kubernetes_validate.validate(item[1], version, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for its built-in kustomize) not installed")
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_kustomizations_build_valid_resources(folder):
    built = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(built) if d]
    assert {d["kind"] for d in docs} >= {"PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    if folder.name == "gpu-serve":
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["readinessProbe"] and container["volumeMounts"]  # the patch merged, not replaced


def _as_pod_template(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}


@pytest.mark.parametrize("role", ["Master", "Worker"])
def test_pytorchjob_pod_templates_pass_the_schema(role):
    template = _one("PyTorchJob")["spec"]["pytorchReplicaSpecs"][role]["template"]
    kubernetes_validate.validate(_as_pod_template(template), K8S_VERSIONS[-1], strict=True)


# KServe's model spec is a core Container plus these fields of its own.
KSERVE_MODEL_FIELDS = {"modelFormat", "protocolVersion", "runtimeVersion", "storageUri", "runtime"}
KSERVE_COMPONENT_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency",
                           "timeout", "canaryTrafficPercent", "logger", "batcher", "model"}


def test_inferenceservice_predictor_passes_the_pod_schema():
    predictor = _one("InferenceService", "jobs")["spec"]["predictor"]
    model = predictor["model"]
    container = {"name": "kserve-container", **{k: v for k, v in model.items() if k not in KSERVE_MODEL_FIELDS}}
    pod_fields = {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}
    template = {"spec": {**pod_fields, "containers": [container]}}
    kubernetes_validate.validate(_as_pod_template(template), K8S_VERSIONS[-1], strict=True)


def _kserve_runtime_pod() -> dict:
    """The custom-container InferenceService's predictor as the pod KServe makes of it."""
    predictor = _one("InferenceService", "jobs-kserve")["spec"]["predictor"]
    return {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}


def test_kserve_runtime_inferenceservice_passes_the_pod_schema():
    kubernetes_validate.validate(_as_pod_template({"spec": _kserve_runtime_pod()}), K8S_VERSIONS[-1], strict=True)


def test_kserve_runtime_inferenceservice_runs_our_image_as_kserves_model_server():
    """Our serve image with SERVE_RUNTIME=kserve, non-root on a read-only root, the archives from the workspace
    volume through KServe's storage initializer, the key from the optional Secret the entry point reads."""
    spec = _kserve_runtime_pod()
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == SERVE_IMAGE and container["name"] == "kserve-container"
    assert env["SERVE_RUNTIME"] == "kserve" and "SERVE_RUNTIME" in (ROOT / "handler/start_torchserve.sh").read_text()
    uri = urllib.parse.urlparse(env["STORAGE_URI"])
    assert uri.scheme == "pvc" and uri.netloc == _one("PersistentVolumeClaim")["metadata"]["name"]
    assert uri.path.rstrip("/").endswith("/model-store") and env["MODEL_STORE"] == "/mnt/models"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == _dockerfile_uid("Dockerfile.serve")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert set(mounts.values()) <= set(volumes)
    assert mounts[container["workingDir"]] in volumes and "emptyDir" in volumes[mounts[container["workingDir"]]]
    key_dir = str(Path(env["KEY_FILE"]).parent)
    assert volumes[mounts[key_dir]]["secret"]["optional"] is True
    assert container["ports"][0]["containerPort"] == 8080
    assert container["readinessProbe"]["exec"]["command"] == ["python", "/home/model-server/ping.py"]


# ----------------------------------------------------------------------------------------------
# cross-references


def _pod_specs() -> list[tuple[str, dict]]:
    specs = []
    for path, doc in DOCS:
        where = f"{path.name}:{doc['kind']}"
        if doc["kind"] in {"Job", "Deployment"}:
            specs.append((where, doc["spec"]["template"]["spec"]))
        if doc["kind"] == "PyTorchJob":
            replicas = doc["spec"]["pytorchReplicaSpecs"]
            specs += [(f"{where}/{role}", r["template"]["spec"]) for role, r in replicas.items()]
    return specs


def _containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def _dockerfile_uid(name: str) -> int:
    return int(re.search(r"useradd [^\n]*--uid (\d+)", (ROOT / name).read_text()).group(1))


@pytest.mark.parametrize(("where", "spec"), _pod_specs(), ids=[w for w, _ in _pod_specs()])
def test_pods_run_our_images_as_their_non_root_user(where, spec):
    serving = "Deployment" in where
    image, dockerfile = (SERVE_IMAGE, "Dockerfile.serve") if serving else (TRAIN_IMAGE, "Dockerfile.train")
    pod_security = spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == _dockerfile_uid(dockerfile)
    assert spec["automountServiceAccountToken"] is False
    for container in _containers(spec):
        assert container["image"] == image
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert security["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize(("where", "spec"), _pod_specs(), ids=[w for w, _ in _pod_specs()])
def test_mounts_name_volumes_that_exist(where, spec):
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in _containers(spec):
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where}: {container['name']} mounts unknown volume {mount['name']}"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
    assert claims == {_one("PersistentVolumeClaim")["metadata"]["name"]}
    config_maps = {d["metadata"]["name"] for _, d in DOCS if d["kind"] == "ConfigMap"}
    assert {v["configMap"]["name"] for v in volumes.values() if "configMap" in v} <= config_maps


def _mount_of(spec: dict, container: dict, path: str) -> dict:
    """The volume behind ``path`` in ``container`` (the longest mount path that contains it)."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = [m for m in container["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    assert mounts, f"{path} is on the read-only root filesystem of {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    return {**volumes[mount["name"]], "readOnly": mount.get("readOnly", False)}


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize(("where", "spec"), [s for s in _pod_specs() if "Deployment" not in s[0]],
                         ids=[w for w, _ in _pod_specs() if "Deployment" not in w])
def test_training_pods_have_gpus_shared_memory_and_writable_scratch(where, spec):
    (trainer,) = spec["containers"]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert _mount_of(spec, trainer, "/dev/shm")["emptyDir"]["medium"] == "Memory"
    for container in _containers(spec):
        assert "emptyDir" in _mount_of(spec, container, "/tmp")  # torchrun's error files, torch.compile, ...
    # The report's matplotlib cache must not land on the read-only root filesystem.
    assert "emptyDir" in _mount_of(spec, trainer, _env(trainer)["MPLCONFIGDIR"]["value"])


def test_train_job_takes_the_api_key_from_an_optional_secret():
    (container,) = _one("Job")["spec"]["template"]["spec"]["containers"]
    ref = _env(container)[Config().api_key_env]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True
    secret = _one("Secret")
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


def _argv_lines(container: dict) -> list[list[str]]:
    """Each command the container runs: its argv, or every line of its `sh -c` script."""
    argv = [*container.get("command", []), *container.get("args", [])]
    if argv[:2] != ["/bin/sh", "-c"]:
        return [argv]
    script = argv[2].replace("\\\n", " ")
    return [shlex.split(line) for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _all_argv() -> list[list[str]]:
    return [argv for _, spec in _pod_specs() for c in _containers(spec) for argv in _argv_lines(c)]


def _options(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def _jobs_calls() -> dict[str, set[str]]:
    """{jobs command: the --options the manifests pass it}."""
    calls: dict[str, set[str]] = {}
    for argv in _all_argv():
        for i, word in enumerate(argv[:-2]):
            if word == "-m" and argv[i + 1] == "jobs":
                calls.setdefault(argv[i + 2], set()).update(_options(argv[i + 3:]))
    return calls


def _help(argv: list[str]) -> str:
    return subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def test_manifests_call_jobs_commands_with_options_they_have():
    calls = _jobs_calls()
    assert set(calls) >= {"run", "clean", "audit", "split", "train", "evaluate", "export", "archive"}
    for command, options in calls.items():
        text = _help(["-m", "jobs", command])
        missing = [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)]
        assert not missing, f"`python -m jobs {command}` has no {missing}"


def test_torchrun_flags_exist():
    lines = [argv for argv in _all_argv() if argv and argv[0] == "torchrun"]
    assert lines
    text = _help(["-m", "torch.distributed.run"])
    for argv in lines:
        flags = _options(argv[:argv.index("-m")])
        missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
        assert not missing, f"torchrun has no {missing}"


def test_pytorchjob_config_map_is_a_valid_job_config(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(_one("ConfigMap", "jobs-ddp-config")["data"]["config.yaml"])
    cfg = load_config(config)  # unknown keys and bad values raise ConfigError
    assert cfg.model_store and cfg.model_store.startswith("/workspace/")


def test_pytorchjob_runs_one_container_on_master_and_workers():
    job = _one("PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    master, worker = (replicas[r]["template"]["spec"] for r in ("Master", "Worker"))
    assert master["containers"] == worker["containers"]
    (container,) = master["containers"]
    assert container["name"] == "pytorch"  # the operator injects its env vars by this name
    assert {"name": "pytorchjob-port", "containerPort": 23456} in container["ports"]
    script = container["args"][0]
    for variable in ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        assert f"${variable}" in script or f"${{{variable}" in script
    # After torchrun, single-process stages must not see the operator's pod-level WORLD_SIZE/RANK.
    after = script.split("torchrun", 1)[1]
    assert after.index("unset WORLD_SIZE RANK") < after.index("-m jobs evaluate")
    # the audit runs on the cleaned images, and split reads audit.json: clean -> audit -> split
    assert [c["args"][0] for c in master["initContainers"]] == ["clean", "audit", "split"]
    assert all(c["command"] == ["python", "-m", "jobs"] for c in master["initContainers"])


def test_single_pod_job_and_compose_run_the_whole_job():
    """The Job and `docker compose run train` call `run`, so they get every stage `run` has (audit included)."""
    (container,) = _one("Job")["spec"]["template"]["spec"]["containers"]
    assert _argv_lines(container)[0][:4] == ["python", "-m", "jobs", "run"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["train"]
    assert "command" not in compose and "entrypoint" not in compose  # the image's default: `run`
    (entrypoint,) = re.findall(r"^ENTRYPOINT (.*)$", (ROOT / "Dockerfile.train").read_text(), re.M)
    assert 'set -- run --out /runs/latest' in json.loads(entrypoint)[4]


def test_serve_deployment_runs_with_a_read_only_root_filesystem():
    spec = _one("Deployment")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # TorchServe writes logs/ and key_file.json into its working directory, archives into TEMP.
    temp = re.search(r"TEMP=(\S+)", (ROOT / "Dockerfile.serve").read_text()).group(1)
    for path in (container["workingDir"], temp, "/tmp"):
        assert "emptyDir" in _mount_of(spec, container, path)
    store = re.search(r"^model_store=(\S+)", (ROOT / "handler" / "config.properties").read_text(), re.M).group(1)
    volume = _mount_of(spec, container, store)
    assert volume["readOnly"] and volume["persistentVolumeClaim"]["readOnly"]
    assert _env(container)["PROBE_KEY_FILE"]["value"] == f"{container['workingDir']}/key_file.json"
    assert "TS_DISABLE_TOKEN_AUTHORIZATION" in (ROOT / "Dockerfile.serve").read_text()


def test_serve_probes_and_the_docker_health_check_run_the_images_ping_script():
    (container,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    dockerfile = (ROOT / "Dockerfile.serve").read_text()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command == ["python", "/home/model-server/ping.py"]
    assert "COPY handler/ping.py /home/model-server/ping.py" in dockerfile
    assert 'HEALTHCHECK ' in dockerfile and 'CMD ["python", "/home/model-server/ping.py"]' in dockerfile


def test_serve_service_autoscaler_and_policies_point_at_the_pods():
    deployment = _one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    service = _one("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": deployment["metadata"]["name"]}
    assert container["resources"]["requests"]["cpu"]  # utilisation is measured against the request
    assert _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    policy = _one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} <= port_names


def test_inferenceservice_uses_the_pytorch_runtime_on_the_workspace_volume():
    isvc = _one("InferenceService", "jobs")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch" and model["protocolVersion"] in {"v1", "v2"}
    uri = urllib.parse.urlparse(model["storageUri"])
    assert uri.scheme == "pvc" and uri.netloc == _one("PersistentVolumeClaim")["metadata"]["name"]
    assert uri.path.rstrip("/").endswith("/kserve")  # export-kserve's default folder under the run folder
    pinned = re.search(r'"torchserve==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert model["runtimeVersion"] == pinned


# ----------------------------------------------------------------------------------------------
# the KServe layout and the probe, against a real TorchServe

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java")


@pytest.fixture(scope="module")
def archived(tmp_path_factory) -> tuple[Config, Path]:
    """A real .mar (random weights) archived with batch settings that differ from the defaults."""
    paths = export_random_model(tmp_path_factory.mktemp("run"), ["ants", "bees"], version="2.1")
    cfg = load_config(None, {"weights": "none", "serve_batch_size": 4, "max_batch_delay_ms": 300,
                             "serve_tuning": "archive"})
    archive(cfg, paths)
    return cfg, paths.out


def _properties(path: Path) -> dict[str, str]:
    return serve.parse_properties(path.read_text())


def test_export_kserve_lays_out_config_and_model_store(archived, tmp_path):
    _, out = archived
    cfg = load_config(None, {})  # other batch settings than the archive's: the archive wins
    dest = export_kserve(cfg, RunPaths(out), tmp_path / "kserve")
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == \
        ["config/config.properties", "config/metrics.yaml", "model-store/classifier.mar"]
    mar = "model-store/classifier.mar"
    assert (dest / mar).read_bytes() == (out / mar).read_bytes()
    props = _properties(dest / "config" / "config.properties")
    assert props["inference_address"] == f"http://127.0.0.1:{PORTS.inference}"
    assert props["model_store"] == str(MOUNT / "model-store")
    assert props["disable_token_authorization"] == "true" and props["enable_envvars_config"] == "false"
    assert "service_envelope" not in props
    assert props["metrics_config"] == str(MOUNT / "config" / "metrics.yaml")
    assert (dest / "config" / "metrics.yaml").read_bytes() == (ROOT / "handler" / "metrics.yaml").read_bytes()
    snapshot = json.loads(props["model_snapshot"])
    version = snapshot["models"]["classifier"]["2.1"]
    assert version["marName"] == "classifier.mar" and version["defaultVersion"] is True
    assert (version["batchSize"], version["maxBatchDelay"]) == (4, 300)
    # Exporting again replaces the files in place.
    assert export_kserve(cfg, RunPaths(out), dest) == dest


def test_export_kserve_plans_workers_and_batching_for_the_pod(archived, tmp_path):
    """An archive that leaves batching to the server gets the plan for the pod KServe runs it in."""
    _, out = archived
    cfg = load_config(None, {"model_store": str(tmp_path / "store")})  # serve_tuning: machine
    paths = RunPaths.for_config(out, cfg)
    archive(cfg, paths)
    dest = export_kserve(cfg, paths, tmp_path / "kserve", pod_cpus=4, pod_gpus=0)
    snapshot = json.loads(_properties(dest / "config" / "config.properties")["model_snapshot"])
    version = snapshot["models"]["classifier"]["2.1"]
    plan = scheduler.serving_plan(cores=4, gpus=0)
    assert (version["minWorkers"], version["maxWorkers"], version["batchSize"], version["maxBatchDelay"]) == \
        (plan.workers, plan.workers, plan.batch_size, plan.max_batch_delay_ms)
    gpu = json.loads(_properties(export_kserve(cfg, paths, tmp_path / "gpu", pod_cpus=8, pod_gpus=1)
                                 / "config" / "config.properties")["model_snapshot"])["models"]["classifier"]["2.1"]
    assert (gpu["maxWorkers"], gpu["batchSize"]) == (1, scheduler.serving_plan(cores=8, gpus=1).batch_size)


def test_export_kserve_names_the_missing_archive(tmp_path):
    with pytest.raises(JobError, match="python -m jobs archive"):
        export_kserve(load_config(None, {}), RunPaths(tmp_path))


def _start_like_kserve(dest: Path, workdir: Path) -> serve.TorchServe:
    """TorchServe as KServe's runtime starts it (`--model-store`, `--ts-config`, nothing else), on free ports."""
    ports = unused_ports()
    workdir.mkdir(parents=True)
    config = workdir / "config.properties"
    # Where KServe mounts dest (/mnt/models), moved to dest itself.
    config.write_text(serve.render_config((dest / "config" / "config.properties").read_text(), host="127.0.0.1",
                                          ports=ports, model_store=dest / "model-store",
                                          metrics_config=dest / "config" / "metrics.yaml"))
    tmp = workdir / "tmp"
    tmp.mkdir()
    with open(workdir / "torchserve.out", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ts.model_server", "--start", "--foreground",
                                 "--model-store", str(dest / "model-store"), "--ts-config", str(config)],
                                cwd=workdir, env={**os.environ, "TEMP": str(tmp), "TMPDIR": str(tmp)},
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return serve.TorchServe(proc, workdir, "127.0.0.1", ports)


PING_SCRIPT = ROOT / "handler" / "ping.py"


def _probe(server: serve.TorchServe) -> subprocess.CompletedProcess:
    """The probe as the image runs it: addresses from the config TorchServe was started with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROBE_")}
    env.update(PROBE_KEY_FILE=str(server.key_file), TS_CONFIG_FILE=str(server.workdir / "config.properties"))
    return subprocess.run([sys.executable, str(PING_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.e2e
@needs_java
def test_kserve_config_serves_concurrent_v1_and_v2_requests(archived, tmp_path):
    """KServe's server forwards each request to these two paths; concurrent ones share a server-side batch."""
    cfg, out = archived
    dest = export_kserve(cfg, RunPaths(out), tmp_path / "kserve")
    server = _start_like_kserve(dest, tmp_path / "ts")
    try:
        server.wait_ready(["classifier"])
        image = base64.b64encode(PHOTO.read_bytes()).decode()
        v1 = (f"{server.inference_url}/v1/models/classifier:predict", {"instances": [{"data": image}] * 2})
        v2 = (f"{server.inference_url}/v2/models/classifier/infer",
              {"id": "r1", "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]})
        with ThreadPoolExecutor(6) as pool:  # within one maxBatchDelay (300 ms): batched together
            answers = list(pool.map(lambda call: requests.post(call[0], json=call[1], timeout=60), [v1, v2] * 3))
        assert [r.status_code for r in answers] == [200] * 6, [r.text[:200] for r in answers]
        predictions = answers[0].json()["predictions"]
        assert len(predictions) == 2 and {p["label"] for p in predictions[0]} == {"ants", "bees"}
        (output,) = answers[1].json()["outputs"]
        assert output["datatype"] == "BYTES" and output["shape"] == [1]
        # Token authorization is off here: the serving probe pings without a key file.
        assert _probe(server).returncode == 0
    finally:
        server.stop()


@pytest.mark.e2e
@needs_java
def test_ping_probe_works_with_token_authorization_and_renews_an_expired_key(archived, tmp_path):
    _, out = archived
    server = serve.start(out / "model-store", tmp_path / "ts", ports=unused_ports())  # token auth on
    try:
        server.wait_ready(["classifier"])
        assert requests.get(f"{server.inference_url}/ping", timeout=10).status_code != 200  # the key is needed
        assert _probe(server).returncode == 0
        # An expired key looks like any refused one: stand one in, as TorchServe leaves it after expiry.
        keys = json.loads(server.key_file.read_text())
        keys["inference"]["key"] = "expired"
        server.key_file.write_text(json.dumps(keys))
        result = _probe(server)
        assert result.returncode == 0, result.stdout + result.stderr
        assert server.keys()["inference"] != "expired"
        assert requests.get(f"{server.inference_url}/ping", headers=server.auth(), timeout=10).status_code == 200
    finally:
        server.stop()
    result = _probe(server)
    assert result.returncode == 1 and "ping:" in result.stdout
