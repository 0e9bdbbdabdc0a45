"""The Helm chart, rendered by Helm's own engine (helm-python-sdk) and validated offline.

Every manifest is checked against the Kubernetes JSON schemas (kubernetes-validate, strict). The
three custom resources (KEDA's ScaledObject and TriggerAuthentication, the Prometheus Operator's
ServiceMonitor) have no schema there, so they are checked against the fields of their documented
APIs that the chart uses (``CRD_SCHEMAS``). Then what matters is asserted: the GPU only when asked
for, the autoscaler on the workers' consumer group and topic, probes on endpoints a real health
server answers, no secret in plain values, and commands the real CLI accepts.
"""

from __future__ import annotations

import re
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

helm = pytest.importorskip("helm_python")

from catstream.cli import _build_parser  # noqa: E402
from catstream.health import HealthServer, NodeStatus  # noqa: E402
from core.node_board import NodeBoard  # noqa: E402
from core.settings import ENV_PREFIX, Settings  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "catstream"
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBERNETES_VERSION = "1.33.0"

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "name": {"type": "string"},
                        },
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "additionalProperties": False,
                            "properties": {
                                "type": {"type": "string"},
                                "metadata": _STRING_MAP,
                                "authenticationRef": {
                                    "type": "object",
                                    "required": ["name"],
                                    "properties": {"name": {"type": "string"}},
                                },
                            },
                        },
                    },
                },
            }
        },
    },
    ("keda.sh/v1alpha1", "TriggerAuthentication"): {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name", "key"],
                            "additionalProperties": False,
                            "properties": {
                                "parameter": {"enum": ["sasl", "username", "password", "tls", "ca", "cert", "key"]},
                                "name": {"type": "string"},
                                "key": {"type": "string"},
                            },
                        },
                    }
                },
            }
        },
    },
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {"type": "object", "properties": {"matchLabels": _STRING_MAP}},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                            },
                        },
                    },
                },
            }
        },
    },
}


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(str(CHART))


def load_values(name: str) -> dict:
    return yaml.safe_load((CHART / "ci" / name).read_text())


def render(chart, values: dict) -> list[dict]:
    rendered = chart.render(values, name="shop", namespace="catstream", is_install=True)
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def find(manifests: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [
        m
        for m in manifests
        if m["kind"] == kind
        and (component is None or m["metadata"]["labels"].get("app.kubernetes.io/component") == component)
    ]


def one(manifests: list[dict], kind: str, component: str | None = None) -> dict:
    (found,) = find(manifests, kind, component)
    return found


def pod_spec(workload: dict) -> dict:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def container_args(workload: dict) -> list[str]:
    (container,) = pod_spec(workload)["containers"]
    return [str(arg) for arg in container["args"]]


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=lambda p: p.stem)
def test_every_manifest_is_valid(chart, values_file):
    manifests = render(chart, yaml.safe_load(values_file.read_text()))
    assert find(manifests, "Deployment", "node")
    for manifest in manifests:
        key = (manifest["apiVersion"], manifest["kind"])
        if key in CRD_SCHEMAS:
            jsonschema.validate(manifest, CRD_SCHEMAS[key])
        else:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_default_values_file_adds_only_the_required_settings():
    assert load_values("default-values.yaml").keys() == {"kafka", "mlflow"}


def test_gpu_resource_only_when_gpu_is_on(chart):
    cpu = one(render(chart, load_values("default-values.yaml")), "Deployment", "node")
    gpu = one(render(chart, load_values("gpu-values.yaml")), "Deployment", "node")
    (cpu_container,) = pod_spec(cpu)["containers"]
    (gpu_container,) = pod_spec(gpu)["containers"]

    assert "nvidia.com/gpu" not in yaml.safe_dump(cpu)
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_container["image"].endswith("-cuda") and not cpu_container["image"].endswith("-cuda")
    assert env_of(gpu_container)["CATSTREAM_PROVIDERS"]["value"].startswith('["CUDAExecutionProvider"')
    assert env_of(cpu_container)["CATSTREAM_PROVIDERS"]["value"] == '["CPUExecutionProvider"]'
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(gpu)["tolerations"]
    assert "tolerations" not in pod_spec(cpu)


def test_node_pod_shares_a_memory_backed_shm_and_drains_within_the_grace_period(chart):
    deployment = one(render(chart, load_values("default-values.yaml")), "Deployment", "node")
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    env = env_of(container)
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert env["CATSTREAM_QUEUE_DIR"]["value"] == "/dev/shm"
    assert spec["terminationGracePeriodSeconds"] >= float(env["CATSTREAM_DRAIN_TIMEOUT_S"]["value"]) + 10
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True

    values = load_values("default-values.yaml") | {"node": {"drainTimeoutSeconds": 60}}
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds"):
        render(chart, values)


def test_pod_disruption_budget_covers_the_node_pods(chart):
    manifests = render(chart, load_values("default-values.yaml"))
    pdb = one(manifests, "PodDisruptionBudget")
    node = one(manifests, "Deployment", "node")
    assert pdb["spec"]["selector"]["matchLabels"] == node["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1


def test_scaled_object_watches_the_workers_group_and_topic(chart):
    assert not find(render(chart, load_values("default-values.yaml")), "ScaledObject")

    values = load_values("autoscaling-values.yaml")
    manifests = render(chart, values)
    scaled = one(manifests, "ScaledObject")
    node = one(manifests, "Deployment", "node")
    (container,) = pod_spec(node)["containers"]
    env = env_of(container)
    (trigger,) = scaled["spec"]["triggers"]

    assert scaled["spec"]["scaleTargetRef"]["name"] == node["metadata"]["name"]
    assert "replicas" not in node["spec"]  # KEDA owns the replica count
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == env["CATSTREAM_CONSUMER_GROUP"]["value"] == "catstream-prod"
    assert trigger["metadata"]["topic"] == env["CATSTREAM_OFFERS_TOPIC"]["value"] == "marketplace.offers"
    assert trigger["metadata"]["bootstrapServers"] == env["CATSTREAM_BOOTSTRAP_SERVERS"]["value"]
    assert (trigger["metadata"]["sasl"], trigger["metadata"]["tls"]) == ("scram_sha512", "enable")
    auth = one(manifests, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert {(r["parameter"], r["name"]) for r in auth["spec"]["secretTargetRef"]} == {
        ("username", "catstream-kafka-user"),
        ("password", "catstream-kafka-user"),
        ("ca", "catstream-kafka-ca"),
    }


def test_probes_hit_endpoints_the_workers_serve(chart, tmp_path):
    deployment = one(render(chart, load_values("default-values.yaml")), "Deployment", "node")
    (container,) = pod_spec(deployment)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = env_of(container)
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {probe["path"] for probe in probes.values()} == {"/healthz", "/readyz"}
    for probe in probes.values():
        assert ports[probe["port"]] == int(env["CATSTREAM_HEALTH_PORT"]["value"])

    # The real health server of a node, on a real board file, before the model is loaded.
    board = NodeBoard.create(1, directory=tmp_path)
    status = NodeStatus(inference_alive=True, workers_alive=(True,), restarts=0, model_version="v1")
    server = HealthServer("127.0.0.1", 0, board, lambda: status).start()
    try:
        answers = {}
        for path in {probe["path"] for probe in probes.values()} | {
            deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
        }:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as response:
                    answers[path] = (response.status, response.read().decode())
            except urllib.error.HTTPError as error:
                answers[path] = (error.code, error.read().decode())
    finally:
        server.stop()
        board.close()
    assert answers["/healthz"] == (200, "ok\n")
    assert answers["/readyz"] == (503, "model not loaded yet\n")
    assert answers["/metrics"][0] == 200 and "catstream_predictions_total" in answers["/metrics"][1]


def test_secrets_come_from_secrets_never_from_values(chart):
    manifests = render(chart, load_values("autoscaling-values.yaml"))
    assert not find(manifests, "Secret")
    for workload in find(manifests, "Deployment") + find(manifests, "CronJob"):
        (container,) = pod_spec(workload)["containers"]
        env = env_of(container)
        for name in ("CATSTREAM_SASL_USERNAME", "CATSTREAM_SASL_PASSWORD"):
            assert "value" not in env[name]
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "catstream-kafka-user"
        assert container["envFrom"] == [{"secretRef": {"name": "catstream-mlflow"}}]
        assert env["CATSTREAM_SSL_CA_LOCATION"]["value"].startswith("/etc/catstream/kafka-tls/")

    values = load_values("autoscaling-values.yaml")
    values["kafka"]["sasl"] = {"existingSecret": ""}
    with pytest.raises(helm.HelmError, match="existingSecret"):
        render(chart, values)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert "password" not in defaults["kafka"]["sasl"] and "username" not in defaults["kafka"]["sasl"]


def test_environment_is_settings_the_workers_read(chart, monkeypatch):
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    for values_file in VALUES_FILES:
        for manifest in render(chart, yaml.safe_load(values_file.read_text())):
            if manifest["kind"] not in ("Deployment", "Job", "CronJob"):
                continue
            (container,) = pod_spec(manifest)["containers"]
            names = {name for name in env_of(container) if name.startswith(ENV_PREFIX)}
            assert names <= fields, (values_file.name, names - fields)
    env = env_of(
        pod_spec(one(render(chart, load_values("autoscaling-values.yaml")), "Deployment", "node"))["containers"][0]
    )
    for key, item in env.items():
        if key.startswith(ENV_PREFIX) and "value" in item:
            monkeypatch.setenv(key, item["value"])
    settings = Settings()  # parses every value the chart sets, as the workers will
    assert settings.dictionaries_dir == "/etc/catstream/dictionaries"
    assert settings.preprocess_workers == 3
    assert settings.max_message_bytes == 2_000_000  # not "2e+06": Helm renders large numbers as floats
    assert settings.providers == ["CPUExecutionProvider"]


def test_commands_are_ones_the_cli_accepts(chart):
    parser = _build_parser()
    defaults = render(chart, load_values("default-values.yaml"))
    node = parser.parse_args(container_args(one(defaults, "Deployment", "node")))
    assert (node.command, node.model) == ("run", "models:/catstream@champion")

    producer = parser.parse_args(container_args(one(render(chart, load_values("producer-values.yaml")), "Job")))
    assert (producer.command, str(producer.data), producer.rate) == ("produce", "/data/offers.csv", 200.0)

    assert not find(defaults, "Deployment", "index")  # off unless asked for
    with_index = render(chart, load_values("index-values.yaml"))
    index = parser.parse_args(container_args(one(with_index, "Deployment", "index")))
    assert (index.command, index.index_location, index.model) == (
        "index",
        "/var/lib/catstream/offer-index",
        "models:/catstream@champion",
    )
    index_pod = pod_spec(one(with_index, "Deployment", "index"))
    (index_container,) = index_pod["containers"]
    assert {p["httpGet"]["path"] for k, p in index_container.items() if k.endswith("Probe")} == {"/healthz", "/readyz"}
    assert env_of(index_container)["CATSTREAM_INDEX_HTTP_PORT"]["value"] == "8091"
    claim = next(v for v in index_pod["volumes"] if v["name"] == "index")
    assert claim["persistentVolumeClaim"]["claimName"] == "offer-index"
    qdrant = render(
        chart, load_values("index-values.yaml") | {"index": {"enabled": True, "location": "qdrant+http://qdrant:6333"}}
    )
    qdrant_pod = pod_spec(one(qdrant, "Deployment", "index"))
    assert not any(v["name"] == "index" for v in qdrant_pod["volumes"])  # the index lives in Qdrant

    retraining = one(defaults, "CronJob", "retraining")
    args = parser.parse_args(container_args(retraining))
    assert args.command == "train" and args.register and args.season_balance
    assert str(args.data) == "/history" and args.cleaning == "off"
    history_mount = next(m for m in pod_spec(retraining)["containers"][0]["volumeMounts"] if m["name"] == "history")
    assert history_mount["mountPath"] == "/history"
    assert env_of(pod_spec(retraining)["containers"][0])["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.mlops:5000"


def test_dictionaries_config_map_reaches_node_and_retraining(chart):
    manifests = render(chart, load_values("autoscaling-values.yaml"))
    config_map = one(manifests, "ConfigMap")
    assert "kurta\tMen > Footwear" in config_map["data"]["category_exclusions.tsv"]
    for workload in (one(manifests, "Deployment", "node"), one(manifests, "CronJob", "retraining")):
        volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == "dictionaries")
        assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    node = one(manifests, "Deployment", "node")
    assert node["spec"]["template"]["metadata"]["annotations"]["checksum/dictionaries"]


def test_prometheus_scraping(chart):
    manifests = render(chart, load_values("autoscaling-values.yaml"))
    monitor = one(manifests, "ServiceMonitor")
    service = one(manifests, "Service")
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    node = one(manifests, "Deployment", "node")
    assert service["spec"]["selector"] == node["spec"]["selector"]["matchLabels"]


def test_missing_required_values_fail_with_a_reason(chart):
    with pytest.raises(helm.HelmError, match=r"kafka\.bootstrapServers is required"):
        render(chart, {"mlflow": {"trackingUri": "http://mlflow:5000"}})
    with pytest.raises(helm.HelmError, match=r"mlflow\.trackingUri"):
        render(chart, {"kafka": {"bootstrapServers": "kafka:9092"}})


def test_every_value_is_documented():
    """Each value has a ``# --`` comment above it, or sits inside a value that has one."""
    lines = (CHART / "values.yaml").read_text().splitlines()

    def documented(number: int) -> bool:
        above = number - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            if lines[above].strip().startswith("# --"):
                return True
            above -= 1
        return False

    undocumented = []
    ancestors: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)(- )?([A-Za-z][\w./-]*):\s*(.*)$", line)
        if not match or line.strip().startswith("#"):
            continue
        indent = len(match[1]) + (2 if match[2] else 0)
        ancestors = [(i, d) for i, d in ancestors if i < indent]
        inherited = any(d for _, d in ancestors)
        is_group = match[4] == "" and not match[2]
        here = documented(number)
        if not (here or inherited or is_group):
            undocumented.append(match[3])
        ancestors.append((indent, here or inherited))
    assert not undocumented


def test_dockerfiles_agree_with_the_project_and_the_chart():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    pins = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().split() if "==" in line)
    packages = {include.rstrip("*") for include in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    for name in ("Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.train"):
        text = (REPO / "docker" / name).read_text()
        base = re.search(r"^FROM python:(\d+)\.(\d+)\.\d+-slim", text, flags=re.M)
        assert base and (3, 11) <= (int(base[1]), int(base[2])) < (3, 13), name
        assert f"USER {values['podSecurityContext']['runAsUser']}:" in text, name
        copied = set(re.findall(r"^COPY (\w+)/", text, flags=re.M))
        if name == "Dockerfile.train":
            assert packages <= copied, name
        else:  # the worker images serve: everything but the training stage
            assert packages - {"training"} <= copied and "training" not in copied, name
        (install,) = [line for line in re.findall(r"pip install ([^\\\n&]+)", text) if ".[" in line]
        assert "-c requirements.lock" in install, name
        extras = set(re.search(r"\.\[([\w,]+)\]", install)[1].split(","))
        assert extras <= set(project["optional-dependencies"]), name
        assert 'ENTRYPOINT ["catstream"]' in text, name
    cuda = (REPO / "docker" / "Dockerfile.cuda").read_text()
    assert "pip install -r requirements-gpu.lock" in cuda and "requirements-gpu.lock ./" in cuda
    gpu = dict(line.split("==") for line in (REPO / "requirements-gpu.lock").read_text().split() if "==" in line)
    assert gpu["onnxruntime-gpu"] == pins["onnxruntime"]  # the GPU build of the served release


def test_the_gpu_lock_pins_the_cuda_libraries_the_torch_wheels_bring():
    """One CUDA stack for training and serving: each nvidia-* pin of requirements-gpu.lock is the
    version installed beside torch here (torch's CUDA wheels bring them)."""
    from importlib.metadata import PackageNotFoundError, version

    gpu = dict(line.split("==") for line in (REPO / "requirements-gpu.lock").read_text().split() if "==" in line)
    nvidia = {name: pinned for name, pinned in gpu.items() if name.startswith("nvidia-")}
    assert {"nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cublas"} <= set(nvidia)
    try:
        installed = {name: version(name) for name in nvidia}
    except PackageNotFoundError as missing:
        pytest.skip(f"torch's CUDA wheels are not installed here ({missing})")
    assert installed == nvidia
