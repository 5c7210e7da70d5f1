"""Kubernetes deployment: render, lint and validate the Helm chart ``helm/cleanplate`` with no cluster.

Helm itself does the rendering: the ``helm-python-sdk`` wheel binds Helm v4's Go SDK (no ``helm``
binary needed), so what is rendered here is what ``helm install`` would send. Every rendered object is
then checked against the Kubernetes OpenAPI schemas of ``kubernetes-validate`` (strict: unknown fields
fail), ServiceMonitors and RayJobs against the subsets of the prometheus-operator v1 and KubeRay v1 CRDs
the chart uses (a RayJob's pod templates against the Kubernetes PodTemplate schema), and the
objects against each other (selectors that select, ports that exist, HPAs that target a Deployment).

Both wheels are in the ``test`` extra; ``cleanplate deploy`` says so when they are missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .errors import ErrorCode, InputError

CHART_DIR = Path(__file__).resolve().parent.parent / "helm" / "cleanplate"
PROFILES = {"default": None, "cpu": "values-cpu.yaml", "gpu": "values-gpu.yaml"}
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships (checked: 1.25 .. 1.37).
MIN_KUBE_VERSION = "1.25"
NOTES = "NOTES.txt"

_DURATION = r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["key", "operator"],
            "properties": {"key": {"type": "string"},
                           "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
# The part of the prometheus-operator ServiceMonitor CRD (monitoring.coreos.com/v1) this chart may
# render, written from its API reference; unknown fields fail, as the API server's pruning would drop them.
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _crd_schema(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A custom resource's schema: the fixed apiVersion and kind, object metadata, and ``spec``; no other
    top-level field."""
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _METADATA,
                           "spec": spec}}


SERVICE_MONITOR_SCHEMA: dict[str, Any] = _crd_schema("monitoring.coreos.com/v1", "ServiceMonitor", {
    "type": "object",
    "additionalProperties": False,
    "required": ["selector", "endpoints"],
    "properties": {
        "selector": _SELECTOR,
        "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
            "any": {"type": "boolean"},
            "matchNames": {"type": "array", "items": {"type": "string"}}}},
        "jobLabel": {"type": "string"},
        "targetLabels": {"type": "array", "items": {"type": "string"}},
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "sampleLimit": {"type": "integer", "minimum": 0},
        "endpoints": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "port": {"type": "string"},
                    "targetPort": {"type": ["integer", "string"]},
                    "path": {"type": "string", "pattern": "^/"},
                    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                    "interval": {"type": "string", "pattern": _DURATION},
                    "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                    "honorLabels": {"type": "boolean"},
                    "honorTimestamps": {"type": "boolean"},
                    "relabelings": {"type": "array", "items": {"type": "object"}},
                    "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                },
            },
        },
    },
})


_RAY_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
# A pod template inside a RayJob: a mapping here; its content is checked as a Kubernetes PodTemplate
# (kubernetes-validate, strict), see :func:`schema_errors`.
_POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"metadata": {"type": "object"},
                                                                         "spec": {"type": "object"}}}
# The part of KubeRay's RayJob CRD (ray.io/v1, KubeRay >= 1.1) this chart may render, written from its API
# reference; unknown fields fail, as the API server's pruning would drop them.
RAY_JOB_SCHEMA: dict[str, Any] = _crd_schema("ray.io/v1", "RayJob", {
    "type": "object",
    "additionalProperties": False,
    "required": ["entrypoint", "rayClusterSpec"],
    "properties": {
        "entrypoint": {"type": "string", "minLength": 1},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "runtimeEnvYAML": {"type": "string"},
        "suspend": {"type": "boolean"},
        "rayClusterSpec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["headGroupSpec"],
            "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "headGroupSpec": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["template"],
                    "properties": {"rayStartParams": _RAY_START_PARAMS, "template": _POD_TEMPLATE,
                                   "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}},
                },
                "workerGroupSpecs": {"type": "array", "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["groupName", "template"],
                    "properties": {
                        "groupName": {"type": "string", "minLength": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                        "minReplicas": {"type": "integer", "minimum": 0},
                        "maxReplicas": {"type": "integer", "minimum": 0},
                        "rayStartParams": _RAY_START_PARAMS,
                        "template": _POD_TEMPLATE,
                    },
                }},
            },
        },
    },
})
# Hand-typed CRD schemas by (apiVersion, kind).
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA,
               ("ray.io/v1", "RayJob"): RAY_JOB_SCHEMA}


def ray_pod_templates(job: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """A RayJob's pod templates as (group, template): the head's ("head"), then each worker group's."""
    cluster = job.get("spec", {}).get("rayClusterSpec", {})
    groups = [("head", cluster.get("headGroupSpec", {}))]
    groups += [(g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs", [])]
    return [(name, g["template"]) for name, g in groups if isinstance(g.get("template"), Mapping)]


# -- values -------------------------------------------------------------------------------------------

def _helm() -> Any:
    try:
        import helm_python
    except ImportError as exc:  # an install without the test extra
        raise InputError("cleanplate deploy needs helm-python-sdk: pip install \"cleanplate[deploy]\"",
                         code=ErrorCode.MISSING_DEPENDENCY) from exc
    return helm_python


def chart_path(chart: Path | None = None) -> Path:
    """The chart directory: ``chart``, or ``helm/cleanplate`` of this checkout.

    Raises InputError if it holds no Chart.yaml.
    """
    path = Path(chart) if chart is not None else CHART_DIR
    if not (path / "Chart.yaml").is_file():
        raise InputError(f"no Helm chart (Chart.yaml) in {path}; pass --chart", code=ErrorCode.BAD_OPTION)
    return path


def merge_values(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's rule for several values files: maps merge key by key, anything else (lists too) is replaced.

    A ``None`` is kept: Helm then deletes that key from the chart's defaults.
    """
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_values(path: Path) -> dict[str, Any]:
    helm = _helm()
    if not path.is_file():
        raise InputError(f"values file not found: {path}", code=ErrorCode.BAD_OPTION)
    try:
        return helm.values_from_yaml(path.read_text()) or {}
    except helm.HelmError as exc:
        raise InputError(f"values file {path}: {_one_line(exc)}", code=ErrorCode.BAD_OPTION) from exc


def load_values(profile: str = "default", files: Iterable[Path] = (), sets: Iterable[str] = (),
                *, chart: Path | None = None) -> dict[str, Any]:
    """Values passed to Helm over the chart's own ``values.yaml``: the profile's file, then ``files`` in
    order, then ``--set`` expressions (``a.b=c``, Helm's syntax), later ones winning.

    Raises InputError for an unknown profile, a missing or malformed file, or a malformed ``--set``.
    """
    helm = _helm()
    chart = chart_path(chart)
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}: one of {', '.join(PROFILES)}", code=ErrorCode.BAD_OPTION)
    values: dict[str, Any] = {}
    if PROFILES[profile]:
        values = _read_values(chart / PROFILES[profile])
    for path in files:
        values = merge_values(values, _read_values(Path(path)))
    for expression in sets:
        try:
            values = merge_values(values, helm.parse_set_string(expression))
        except helm.HelmError as exc:
            raise InputError(f"--set {expression}: {_one_line(exc)}", code=ErrorCode.BAD_OPTION) from exc
    return values


# -- render and lint ----------------------------------------------------------------------------------

def render(values: Mapping[str, Any] | None = None, *, chart: Path | None = None, name: str = "cleanplate",
           namespace: str = "default") -> dict[str, str]:
    """Render the chart with Helm (offline, as ``helm template``): template path -> manifest text.

    The values are checked against ``values.schema.json`` and the templates' ``required``/``fail`` guards.
    Raises InputError naming the first problem (a missing required value, a bad release name...).
    """
    helm = _helm()
    chart = chart_path(chart)
    try:
        helm.validate_release_name(name)
        with helm.Chart.load(chart) as loaded:
            return loaded.render(dict(values or {}), name=name, namespace=namespace, is_install=True)
    except helm.HelmError as exc:
        raise InputError(_one_line(exc), code=ErrorCode.BAD_OPTION) from exc


def manifests(rendered: Mapping[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects of a render (NOTES.txt and empty documents left out), in template order."""
    import yaml

    objects = []
    for path in sorted(rendered):
        if path.endswith(NOTES):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(rendered[path]) if doc)
    return objects


def notes(rendered: Mapping[str, str]) -> str:
    """The rendered NOTES.txt: what ``helm install`` prints about calling the service."""
    return next((text for path, text in rendered.items() if path.endswith(NOTES)), "")


def lint(values: Mapping[str, Any] | None = None, *, chart: Path | None = None) -> list[str]:
    """``helm lint --strict`` of the chart with ``values``: its warnings and errors (info notes skipped)."""
    helm = _helm()
    report = helm.lint(chart_path(chart), dict(values or {}), strict=True)
    found = [f"{m['path']}: {m['error']}" for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    return found + [e for e in report.get("errors", []) if not any(e in f for f in found)]


def write_manifests(rendered: Mapping[str, str], out: Path) -> list[Path]:
    """Write each non-empty template's manifest under ``out`` as ``helm template --output-dir`` does."""
    written = []
    for path, text in sorted(rendered.items()):
        if path.endswith(NOTES) or not text.strip():
            continue
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text if text.endswith("\n") else text + "\n")
        written.append(target)
    return written


# -- validation ----------------------------------------------------------------------------------------

def _ref(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def schema_errors(objects: Iterable[Mapping[str, Any]], kube_version: str | None = None) -> list[str]:
    """Each object against the Kubernetes OpenAPI schema of ``kube_version`` (default: the newest that
    kubernetes-validate ships), strict: unknown fields are errors. ServiceMonitors and RayJobs are checked
    against :data:`CRD_SCHEMAS`, a RayJob's pod templates as Kubernetes PodTemplates; any other kind without a
    schema is an error, not a skip."""
    try:
        import jsonschema
        import kubernetes_validate
        from kubernetes_validate.utils import latest_version
    except ImportError as exc:
        raise InputError("validation needs kubernetes-validate: pip install \"cleanplate[deploy]\"",
                         code=ErrorCode.MISSING_DEPENDENCY) from exc
    version = kube_version or latest_version()
    crds = {key: jsonschema.Draft202012Validator(schema) for key, schema in CRD_SCHEMAS.items()}

    def kube(obj: Mapping[str, Any], where: str) -> list[str]:
        try:
            kubernetes_validate.validate(dict(obj), version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return [f"{where}: {'/'.join(map(str, exc.absolute_path))}: {exc.message}"]
        except kubernetes_validate.SchemaNotFoundError as exc:
            return [f"{where}: {exc.message}"]
        except kubernetes_validate.VersionNotSupportedError as exc:
            raise InputError(exc.message, code=ErrorCode.BAD_OPTION) from exc
        return []

    errors = []
    for obj in objects:
        crd = crds.get((obj.get("apiVersion"), obj.get("kind")))
        if crd is None:
            errors += kube(obj, _ref(obj))
            continue
        errors += [f"{_ref(obj)}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd.iter_errors(obj)]
        if obj.get("kind") == "RayJob":
            for group, template in ray_pod_templates(obj):
                pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
                errors += kube(pod, f"{_ref(obj)}: {group} pod template")
    return errors


def _selects(selector: Mapping[str, Any] | None, labels: Mapping[str, Any]) -> bool:
    match = (selector or {}).get("matchLabels", selector or {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def reference_errors(objects: list[Mapping[str, Any]]) -> list[str]:
    """Objects that point at nothing: a Service or PDB selecting no pods, a named port no container has,
    an HPA whose target is missing (or that fights a fixed ``replicas``), a ServiceMonitor selecting no
    Service port, a ConfigMap volume or ``configMapKeyRef`` naming no ConfigMap of the render, a Downward
    API ``resourceFieldRef`` naming no container of the pod or a limit its container does not set (the
    kubelet would hand over the node's allocatable amount: the gateway's memory budget would follow the node).

    Secrets and PersistentVolumeClaims are not checked: they may live outside the chart
    (``gateway.auth.existingSecret``, the model repository's PVC and its object-storage credentials).
    """
    by_kind: dict[str, list[Mapping[str, Any]]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    configmaps = {c["metadata"]["name"] for c in by_kind.get("ConfigMap", [])}
    errors = []

    def pods_selected(selector: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        return [d["spec"]["template"] for d in deployments.values()
                if _selects(selector, d["spec"]["template"]["metadata"].get("labels", {}))]

    def container_ports(pod: Mapping[str, Any]) -> set[Any]:
        ports: set[Any] = set()
        for c in pod["spec"].get("containers", []):
            for p in c.get("ports", []):
                ports |= {p.get("name"), p["containerPort"]}
        return ports

    for name, dep in deployments.items():
        pod = dep["spec"]["template"]
        if not _selects(dep["spec"]["selector"], pod["metadata"].get("labels", {})):
            errors.append(f"Deployment/{name}: selector does not match its pod template")
        ports = container_ports(pod)
        all_containers = pod["spec"].get("containers", []) + pod["spec"].get("initContainers", [])
        by_name = {c["name"]: c for c in all_containers}
        for c in all_containers:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if port is not None and port not in ports:
                    errors.append(f"Deployment/{name}: {c['name']}.{probe} uses port {port!r}, "
                                  "not a container port")
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref and ref["name"] not in configmaps:
                    errors.append(f"Deployment/{name}: env {env['name']} names ConfigMap {ref['name']}, "
                                  "not rendered")
                field = env.get("valueFrom", {}).get("resourceFieldRef")
                if field:
                    target = field.get("containerName") or c["name"]
                    kind, _, resource = field["resource"].partition(".")
                    if target not in by_name:
                        errors.append(f"Deployment/{name}: env {env['name']} reads {field['resource']} of "
                                      f"container {target!r}, not in the pod")
                    elif kind == "limits" and resource not in (by_name[target].get("resources", {})
                                                               .get("limits") or {}):
                        errors.append(f"Deployment/{name}: env {env['name']} reads {field['resource']} of "
                                      f"container {target!r}, which sets no such limit (the node's "
                                      "allocatable would be read)")
        for vol in pod["spec"].get("volumes", []):
            if "configMap" in vol and vol["configMap"]["name"] not in configmaps:
                errors.append(f"Deployment/{name}: volume {vol['name']} names ConfigMap "
                              f"{vol['configMap']['name']}, not rendered")
    for svc in by_kind.get("Service", []):
        pods = pods_selected(svc["spec"].get("selector", {}))
        if not pods:
            errors.append(f"{_ref(svc)}: selects no pods of the chart")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            if pods and not all(target in container_ports(p) for p in pods):
                errors.append(f"{_ref(svc)}: targetPort {target!r} is not a port of the selected pods")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not pods_selected(pdb["spec"]["selector"]):
            errors.append(f"{_ref(pdb)}: selects no pods of the chart")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        target = hpa["spec"]["scaleTargetRef"]
        dep = deployments.get(target["name"])
        if target["kind"] != "Deployment" or dep is None:
            errors.append(f"{_ref(hpa)}: scaleTargetRef {target['kind']}/{target['name']} is not rendered")
        elif "replicas" in dep["spec"]:
            errors.append(f"{_ref(hpa)}: Deployment/{target['name']} sets replicas, which every upgrade "
                          "would reset under the autoscaler")
        low, high = hpa["spec"].get("minReplicas", 1), hpa["spec"]["maxReplicas"]
        if isinstance(low, int) and isinstance(high, int) and low > high:
            errors.append(f"{_ref(hpa)}: minReplicas > maxReplicas")
    for job in by_kind.get("RayJob", []):
        errors += _ray_job_errors(job)
    for monitor in by_kind.get("ServiceMonitor", []):
        services = [s for s in by_kind.get("Service", [])
                    if _selects(monitor["spec"]["selector"], s["metadata"].get("labels", {}))]
        if not services:
            errors.append(f"{_ref(monitor)}: selects no Service of the chart")
        for ep in monitor["spec"]["endpoints"]:
            named = [{p.get("name") for p in s["spec"]["ports"]} for s in services]
            if services and not all(ep.get("port") in ports for ports in named):
                errors.append(f"{_ref(monitor)}: port {ep.get('port')!r} is not a port of the selected "
                              "Services")
    return errors


def _ray_job_errors(job: Mapping[str, Any]) -> list[str]:
    """What KubeRay or the job would trip on although each field is valid: a worker group whose replicas lie
    outside min..max, an extended resource (a GPU) requested without the same limit, a ttl on a cluster that
    is kept, and an entrypoint that asks for more GPU actors than the worker groups have GPUs (Ray Data would
    wait for them forever)."""
    spec, errors = job["spec"], []
    if not spec.get("shutdownAfterJobFinishes", False) and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append(f"{_ref(job)}: ttlSecondsAfterFinished without shutdownAfterJobFinishes (KubeRay refuses it)")
    gpus = 0.0
    for group in spec["rayClusterSpec"].get("workerGroupSpecs", []):
        low, n, high = (group.get(k) for k in ("minReplicas", "replicas", "maxReplicas"))
        if None not in (low, n, high) and not low <= n <= high:
            errors.append(f"{_ref(job)}: worker group {group['groupName']}: replicas {n} outside {low}..{high}")
        for c in group["template"]["spec"].get("containers", []):
            limits = (c.get("resources") or {}).get("limits") or {}
            gpus += (n or 0) * sum(float(v) for k, v in limits.items() if k.endswith("/gpu"))
    for _, template in ray_pod_templates(job):
        for c in template["spec"].get("containers", []):
            res = c.get("resources") or {}
            for name, amount in (res.get("requests") or {}).items():
                if "/" in name and (res.get("limits") or {}).get(name) != amount:
                    errors.append(f"{_ref(job)}: container {c['name']} requests {name} without the same limit")
    words = spec["entrypoint"].split()
    if "--ray" in words and "--num-gpus-per-worker" in words:
        def value(flag: str, default: str) -> float:
            return float(words[words.index(flag) + 1]) if flag in words else float(default)

        wanted = value("--workers", "1") * value("--num-gpus-per-worker", "0")
        if wanted > gpus:
            errors.append(f"{_ref(job)}: the entrypoint's actors need {wanted:g} GPUs, the worker groups have "
                          f"{gpus:g}")
    return errors


def validate(objects: list[Mapping[str, Any]], kube_version: str | None = None) -> list[str]:
    """:func:`schema_errors` then :func:`reference_errors`; empty when every object would be accepted."""
    errors = schema_errors(objects, kube_version)
    try:
        return errors + reference_errors(objects)
    except (KeyError, TypeError, AttributeError):
        if errors:  # an object too malformed to follow its references: its schema errors say why
            return errors
        raise


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# -- command line (`cleanplate deploy ...`) -------------------------------------------------------------

deploy_app = typer.Typer(help="Kubernetes: render, lint and validate the Helm chart (no cluster needed).",
                         no_args_is_help=True)

ProfileOpt = Annotated[str, typer.Option(help=f"values profile: {', '.join(PROFILES)} (files in the chart)")]
ValuesOpt = Annotated[Optional[list[Path]], typer.Option("--values", "-f",
                                                         help="values file(s), after the profile")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set",
                                                     help="a=b,c.d=e (Helm syntax), after the files")]
ChartOpt = Annotated[Optional[Path], typer.Option(help="chart directory (default: helm/cleanplate)")]


@deploy_app.command("render")
def render_command(
    profile: ProfileOpt = "default",
    values: ValuesOpt = None,
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="write one file per template here "
                                                     "(default: stdout)")] = None,
    name: Annotated[str, typer.Option(help="release name")] = "cleanplate",
    namespace: Annotated[str, typer.Option(help="namespace")] = "default",
    chart: ChartOpt = None,
    check: Annotated[bool, typer.Option("--validate/--no-validate",
                                        help="check every object against the Kubernetes schemas")] = True,
    kube_version: Annotated[Optional[str], typer.Option(help="Kubernetes version of the schemas "
                                                             "(default: the newest known)")] = None,
) -> None:
    """Render the chart for a profile plus values files, as `helm template` would, and validate it."""
    chosen = load_values(profile, values or [], set_ or [], chart=chart)
    rendered = render(chosen, chart=chart, name=name, namespace=namespace)
    objects = manifests(rendered)
    if check:
        problems = validate(objects, kube_version)
        if problems:
            raise InputError(f"{len(problems)} problem(s): " + "; ".join(problems), code=ErrorCode.INVALID_MANIFEST)
    if out is None:
        for path, text in sorted(rendered.items()):
            if not path.endswith(NOTES) and text.strip():
                typer.echo(f"---\n# Source: {path}\n{text.strip()}")
    else:
        written = write_manifests(rendered, out)
        typer.echo(f"wrote {len(objects)} objects in {len(written)} files under {out}", err=True)


@deploy_app.command("lint")
def lint_command(profile: ProfileOpt = "default", values: ValuesOpt = None, set_: SetOpt = None,
                 chart: ChartOpt = None) -> None:
    """`helm lint --strict` the chart with a profile plus values files; exit 2 on any warning or error."""
    problems = lint(load_values(profile, values or [], set_ or [], chart=chart), chart=chart)
    if problems:
        raise InputError(f"helm lint: {'; '.join(problems)}", code=ErrorCode.LINT)
    typer.echo(f"helm lint: {chart_path(chart)} ({profile}) clean", err=True)
