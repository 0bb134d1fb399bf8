"""What the rendered Kubernetes manifests promise: valid against the Kubernetes schemas
(offline), env vars the code reads, probes on routes that exist, commands the CLI parses,
grace periods that cover the drain, no committed secret value, and the wiring between the
pieces (DNS name, headless Service, NetworkPolicy)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import kubernetes_validate
import pytest
from botocore.configprovider import BOTOCORE_DEFAUT_SESSION_VARIABLES
from botocore.credentials import EnvProvider

from gateway.app import create_app
from gateway.cli.main import _parser
from gateway.services import Services
from gateway.settings import ENV_VARS, Settings
from runtime.http.app import create_runtime_app
from runtime.http.process import DRAIN_TIMEOUT_S

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
# The cluster version the schemas are pinned to (kubernetes-validate ships them: offline).
K8S_VERSION = "1.32.0"
WORKLOADS = ("Deployment", "Job")
SECRETISH = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|DATABASE_URL|REDIS_URL")


def _botocore_env() -> set[str]:
    names = {EnvProvider.ACCESS_KEY, EnvProvider.SECRET_KEY, EnvProvider.EXPIRY_TIME,
             *EnvProvider.TOKENS}
    for spec in BOTOCORE_DEFAUT_SESSION_VARIABLES.values():
        env = spec[1]
        names.update([env] if isinstance(env, str) else list(env or ()))
    return names


AWS_ENV = _botocore_env()


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in by_kind(objects, kind) if o["metadata"]["name"] == name]
    return found


def containers(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container and init container."""
    out = []
    for workload in (o for o in objects if o["kind"] in WORKLOADS):
        spec = workload["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            out.append((workload, c))
    return out


def environment(objects: list[dict[str, Any]], container: dict[str, Any]
                ) -> dict[str, str | None]:
    """The container's variables: literal values, None for those from a Secret."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, "envFrom only from ConfigMaps (keys known)"
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def command(container: dict[str, Any], env: dict[str, str | None]) -> list[str]:
    """Its args with $(VAR) expanded as the kubelet does."""
    return [re.sub(r"\$\((\w+)\)", lambda m: str(env[m.group(1)]), a)
            for a in container.get("args", [])]


def gateway_paths() -> set[str]:
    # The gateway app itself; its services are never reached (no request is made).
    app = create_app(Settings(), services=cast(Services, object()))
    return {route.path for route in app.routes}


def runtime_paths() -> set[str]:
    return {route.path for route in create_runtime_app().routes}


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_object_validates_against_the_kubernetes_schemas(manifests: Any) -> None:
    _name, objects = manifests
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job",
            "ConfigMap", "NetworkPolicy"} <= kinds
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_schema_validation_catches_a_misspelt_field(manifests: Any) -> None:
    _name, objects = manifests
    deployment = dict(by_kind(objects, "Deployment")[0])
    deployment["spec"] = {**deployment["spec"], "replica": 2}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_env_vars_are_ones_the_code_reads_and_parse(manifests: Any) -> None:
    _name, objects = manifests
    for _workload, container in containers(objects):
        env = environment(objects, container)
        unknown = set(env) - ENV_VARS - AWS_ENV
        assert not unknown, f"{container['name']}: nothing reads {sorted(unknown)}"
        # The literal values parse as settings (secrets stand in as placeholders).
        Settings.from_env(environ={k: v if v is not None else "x" for k, v in env.items()
                                   if k.startswith("LORAGATE_")})


def test_commands_parse_with_the_cli(manifests: Any) -> None:
    _name, objects = manifests
    seen = set()
    workload_of = {"serve": "loragate-gateway", "runtime": "loragate-runtime",
                   "migrate": "loragate-migrate"}
    for workload, container in containers(objects):
        if "command" in container:  # an init container running python itself
            continue
        args = _parser().parse_args(command(container, environment(objects, container)))
        seen.add(args.command)
        assert workload["metadata"]["name"] == workload_of[args.command]
    assert seen == {"serve", "runtime", "migrate"}


def test_probes_point_at_routes_that_exist(manifests: Any) -> None:
    _name, objects = manifests
    routes = {"serve": gateway_paths(), "runtime": runtime_paths()}
    assert {"/healthz", "/readyz", "/metrics"} <= routes["serve"]
    for workload, container in containers(objects):
        args = container.get("args", [])
        if not args or args[0] not in routes:
            continue
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        probes = [container[k] for k in ("readinessProbe", "livenessProbe", "startupProbe")
                  if k in container]
        assert container.get("readinessProbe", {}).get("httpGet"), "readiness is an HTTP route"
        for probe in probes:
            action = probe.get("httpGet") or probe.get("tcpSocket")
            assert action["port"] in ports
            if "httpGet" in probe:
                assert probe["httpGet"]["path"] in routes[args[0]]
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        if "prometheus.io/path" in annotations:
            assert annotations["prometheus.io/path"] in routes[args[0]]
            assert int(annotations["prometheus.io/port"]) in ports.values()
    gateway = one(objects, "Deployment", "loragate-gateway")["spec"]["template"]["spec"]
    probes = gateway["containers"][0]
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    runtime = one(objects, "Deployment", "loragate-runtime")["spec"]["template"]["spec"]
    assert runtime["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/health"


def test_grace_periods_cover_pre_stop_and_the_drain(manifests: Any) -> None:
    _name, objects = manifests
    limits = {"loragate-runtime": DRAIN_TIMEOUT_S, "loragate-gateway": Settings().request_timeout_s}
    for name, drain_s in limits.items():
        spec = one(objects, "Deployment", name)["spec"]["template"]["spec"]
        pre_stop = spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pre_stop > 0
        assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain_s


def test_no_secret_value_is_committed(manifests: Any) -> None:
    _name, objects = manifests
    assert not by_kind(objects, "Secret"), "Secrets are created apart, never rendered"
    for config in by_kind(objects, "ConfigMap"):
        assert not [k for k in config["data"] if SECRETISH.search(k)], config["data"]
        for value in config["data"].values():
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), "credentials in a URL"
    referenced = set()
    for _workload, container in containers(objects):
        for var in container.get("env", []):
            if SECRETISH.search(var["name"]):
                assert "value" not in var, f"{var['name']} has a literal value"
                referenced.add(var["valueFrom"]["secretKeyRef"]["name"])
    readme = (ROOT / "README.md").read_text()
    for secret in referenced:  # the README tells the operator to create each one
        assert f"create secret generic {secret} --from-literal=" in readme, secret


def test_gateways_find_runtimes_through_the_headless_service(manifests: Any) -> None:
    _name, objects = manifests
    gateway = one(objects, "Deployment", "loragate-gateway")
    runtime = one(objects, "Deployment", "loragate-runtime")
    env = environment(objects, gateway["spec"]["template"]["spec"]["containers"][0])
    settings = Settings.from_env(environ={"LORAGATE_RUNTIMES": str(env["LORAGATE_RUNTIMES"])})
    (dns,) = settings.dns_runtimes
    name, port = dns.removeprefix("dns+http://").split(":")
    service = one(objects, "Service", name)
    assert service["spec"]["clusterIP"] == "None"
    assert matches(service["spec"]["selector"], pod_labels(runtime))
    assert not matches(service["spec"]["selector"], pod_labels(gateway))
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == int(port)
    container = runtime["spec"]["template"]["spec"]["containers"][0]
    args = _parser().parse_args(command(container, environment(objects, container)))
    assert args.port == int(port) and args.host == "0.0.0.0"
    # The runtimes refuse a non-loopback bind without the token: both sides get the same one.
    tokens = {c["name"]: {v["valueFrom"]["secretKeyRef"]["name"] for v in c["env"]
                          if v["name"] == "LORAGATE_RUNTIME_TOKEN"}
              for c in (gateway["spec"]["template"]["spec"]["containers"][0], container)}
    assert tokens["gateway"] == tokens["runtime"] and len(tokens["gateway"]) == 1


def test_only_gateway_pods_reach_runtime_pods(manifests: Any) -> None:
    _name, objects = manifests
    gateway = pod_labels(one(objects, "Deployment", "loragate-gateway"))
    runtime = pod_labels(one(objects, "Deployment", "loragate-runtime"))
    policies = [p for p in by_kind(objects, "NetworkPolicy")
                if matches(p["spec"]["podSelector"]["matchLabels"], runtime)]
    assert len(policies) == 1
    (policy,) = policies
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}  # no namespace or CIDR allowed in
    assert matches(source["podSelector"]["matchLabels"], gateway)
    assert not matches(source["podSelector"]["matchLabels"], runtime)
    assert [p["port"] for p in rule["ports"]] == [8100]


def test_overlays_differ_where_they_should(manifests: Any) -> None:
    name, objects = manifests
    runtime = one(objects, "Deployment", "loragate-runtime")["spec"]["template"]["spec"]
    resources = runtime["containers"][0]["resources"]
    gateway = one(objects, "Deployment", "loragate-gateway")["spec"]["template"]["spec"]
    gateway_env = environment(objects, gateway["containers"][0])
    runtime_env = environment(objects, runtime["containers"][0])
    assert "LORAGATE_REDIS_URL" not in runtime_env  # it would register a second URL
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert one(objects, kind, "loragate-gateway")
    assert one(objects, "PodDisruptionBudget", "loragate-runtime")
    if name == "production":
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert gateway_env["LORAGATE_DEVICE"] == "cuda"
        for var in ("LORAGATE_DATABASE_URL", "LORAGATE_REDIS_URL", "AWS_ACCESS_KEY_ID"):
            assert var in gateway_env and gateway_env[var] is None  # from a Secret
        assert gateway_env["LORAGATE_S3_BUCKET"]
    else:
        assert name == "dev"
        assert "nvidia.com/gpu" not in str(resources) and "tolerations" not in runtime
        assert "LORAGATE_DATABASE_URL" not in gateway_env  # SQLite under the data dir
        hpa = one(objects, "HorizontalPodAutoscaler", "loragate-gateway")["spec"]
        assert hpa["minReplicas"] == hpa["maxReplicas"] == 1
