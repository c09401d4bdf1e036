"""Offline checks of the deployment files: k8s/ manifests, deployments/*.yaml, their Serve configs.

- ray.io objects against the openAPIV3Schema of their KubeRay CRD (tests/data/kuberay-crds), read as
  a Kubernetes API server with strict field validation reads them: unknown fields are errors,
  fields with a default are not required; plus the rules KubeRay's operator enforces itself
  (ray-operator/controllers/ray/utils/validation.go).
- Built-in kinds (and the pod templates and Service embedded in the Ray objects) against the
  Kubernetes OpenAPI schema of one fixed version, with kubernetes-validate (bundled schemas, offline).
- Every Serve config (serveConfigV2, deployments/*.yaml) against ServeDeploySchema, its
  application's args against ServeConfig, and the application built as Serve would build it.
- The manifests against each other: Secrets, volumes, Services, custom resources and capacity.
Each check is also shown to fail on a manifest with a deliberate error.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from specmoe_ray.config import APP_IMPORT_PATH, ConfigError, ServeConfig

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "k8s"
DEPLOYMENTS_DIR = ROOT / "deployments"
CRD_DIR = ROOT / "tests" / "data" / "kuberay-crds"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
KUBERNETES_VERSION = "1.33.0"  # the Kubernetes API the built-in kinds are checked against
NAMESPACE = "specmoe"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=Loader) if d is not None]


@cache
def _manifests() -> tuple[tuple[str, dict[str, Any]], ...]:
    return tuple(
        (p.name, d)
        for p in sorted(K8S_DIR.glob("*.yaml"))
        if p.name != "kustomization.yaml"
        for d in load_yaml_docs(p)
    )


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) of every object in k8s/, deep copies (tests may mutate them)."""
    return copy.deepcopy(list(_manifests()))


def the(kind: str, docs: list[tuple[str, dict]] | None = None) -> dict[str, Any]:
    [doc] = [d for _, d in (docs if docs is not None else manifests()) if d["kind"] == kind]
    return doc


def fmt(error: jsonschema.ValidationError) -> str:
    return f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"


# -- KubeRay CRDs ---------------------------------------------------------------------------------


SCHEMA_MAPS = ("properties", "patternProperties")  # name -> schema
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
SCHEMA_ONE = ("items", "additionalProperties", "not")


def openapi_to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural OpenAPI v3 schema -> JSON Schema with the API server's strictness:
    objects with `properties` take no other keys (unless x-kubernetes-preserve-unknown-fields),
    `nullable` admits null, and a required field with a default is not required (the server
    fills it in before validating). int-or-string fields already carry anyOf [integer, string].
    CEL rules (x-kubernetes-validations: immutability, managedBy values) are not evaluated."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in SCHEMA_MAPS:
            out[key] = {name: openapi_to_jsonschema(sub) for name, sub in value.items()}
        elif key in SCHEMA_LISTS:
            out[key] = [openapi_to_jsonschema(sub) for sub in value]
        elif key in SCHEMA_ONE and isinstance(value, dict):
            out[key] = openapi_to_jsonschema(value)
        else:
            out[key] = value
    props = node.get("properties")
    if props is not None:
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        if "required" in node:
            out["required"] = [r for r in node["required"] if "default" not in props.get(r, {})]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@cache
def crd_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    group, _, version = api_version.partition("/")
    [crd] = load_yaml_docs(CRD_DIR / CRD_FILES[kind])
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    [v] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert v["served"], f"{kind} {api_version} is not served"
    return jsonschema.Draft7Validator(openapi_to_jsonschema(v["schema"]["openAPIV3Schema"]))


def crd_errors(doc: dict[str, Any]) -> list[str]:
    if doc.get("kind") not in CRD_FILES or not str(doc.get("apiVersion", "")).startswith("ray.io/"):
        return [f"not a KubeRay object: {doc.get('apiVersion')} {doc.get('kind')}"]
    validator = crd_validator(doc["kind"], doc["apiVersion"])
    return sorted(fmt(e) for e in validator.iter_errors(doc))


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME_LEN = {"RayCluster": 53, "RayService": 47, "RayJob": 47}  # utils/constant.go


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def cluster_spec_errors(spec: dict[str, Any], where: str) -> list[str]:
    """ValidateRayClusterSpec: the rules that are not in the CRD schema (the subset we rely on)."""
    errors = []
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    v2 = autoscaling and (spec.get("autoscalerOptions") or {}).get("version", "v2") == "v2"
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    names = [n for n, _ in groups[1:]]
    if len(set(names)) != len(names):
        errors.append(f"{where}: duplicate worker group names {names}")
    for name, g in groups:
        pod = g["template"]["spec"]
        if not pod.get("containers"):
            errors.append(f"{where}.{name}: needs at least one container")
        params = g.get("rayStartParams") or {}
        if g.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{where}.{name}: resources set both in rayStartParams and in resources")
        if "labels" in params:
            errors.append(f"{where}.{name}: rayStartParams['labels'] is not supported; use labels")
        if v2 and pod.get("restartPolicy") not in (None, "Never"):
            errors.append(f"{where}.{name}: restartPolicy must be Never or unset with autoscaler v2")
        if name == "head":
            continue
        if not DNS1123.match(name):
            errors.append(f"{where}.{name}: group name must be a DNS-1123 label")
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"{where}.{name}: minReplicas and maxReplicas are required without autoscaling")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"{where}.{name}: minReplicas {lo} > maxReplicas {hi}")
        if g.get("idleTimeoutSeconds") is not None and not v2:
            errors.append(f"{where}.{name}: idleTimeoutSeconds needs autoscaler v2")
    auth = spec.get("authOptions") or {}
    if auth.get("mode", "disabled") == "token":
        rv = spec.get("rayVersion", "")
        if not rv or _version_tuple(rv) < (2, 52, 0):
            errors.append(f"{where}: authOptions.mode token needs rayVersion >= 2.52.0, got {rv!r}")
    return errors


def kuberay_errors(doc: dict[str, Any]) -> list[str]:
    """The operator's own checks (validation.go) for RayService and RayJob, the ones our manifests meet."""
    kind, name = doc["kind"], doc["metadata"].get("name", "")
    errors = []
    if not DNS1035.match(name) or len(name) > MAX_NAME_LEN[kind]:
        errors.append(f"metadata.name {name!r}: a DNS-1035 label of at most {MAX_NAME_LEN[kind]} characters")
    spec = doc["spec"]
    if kind == "RayService":
        errors += cluster_spec_errors(spec["rayClusterConfig"], "rayClusterConfig")
        if ((spec["rayClusterConfig"]["headGroupSpec"].get("headService") or {}).get("metadata") or {}).get(
            "name"
        ):
            errors.append("headGroupSpec.headService.metadata.name must not be set in a RayService")
        upgrade = spec.get("upgradeStrategy") or {}
        kind_ = upgrade.get("type")
        if kind_ not in (None, "NewCluster", "NewClusterWithIncrementalUpgrade", "None"):
            errors.append(
                f"upgradeStrategy.type {kind_!r}: NewCluster, NewClusterWithIncrementalUpgrade or None"
            )
        if kind_ == "NewClusterWithIncrementalUpgrade":
            if not spec["rayClusterConfig"].get("enableInTreeAutoscaling"):
                errors.append("NewClusterWithIncrementalUpgrade needs the Ray autoscaler")
            if not upgrade.get("clusterUpgradeOptions"):
                errors.append("NewClusterWithIncrementalUpgrade needs clusterUpgradeOptions")
    elif kind == "RayJob":
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            errors.append("one of rayClusterSpec or clusterSelector must be set")
        if spec.get("rayClusterSpec"):
            errors += cluster_spec_errors(spec["rayClusterSpec"], "rayClusterSpec")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errors.append("a suspended RayJob needs shutdownAfterJobFinishes")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if spec.get("entrypointResources"):
            res = json.loads(spec["entrypointResources"])
            if not isinstance(res, dict) or not all(isinstance(v, (int, float)) for v in res.values()):
                errors.append("entrypointResources must be a JSON object of numbers")
        if not isinstance(yaml.safe_load(spec.get("runtimeEnvYAML") or "{}"), dict):
            errors.append("runtimeEnvYAML must be a YAML mapping")
    return errors


def ray_clusters(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayCluster specs inside a Ray object (none for other kinds)."""
    if doc.get("kind") not in CRD_FILES:
        return []
    spec = doc.get("spec") or {}
    return [s for s in (spec.get("rayClusterConfig"), spec.get("rayClusterSpec")) if s]


def pod_templates(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    groups = [("head", cluster["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])
    ]
    return [(name, g["template"]) for name, g in groups]


# -- built-in kinds -------------------------------------------------------------------------------


def builtin_errors(doc: dict[str, Any]) -> list[str]:
    """kubernetes-validate, strict (unknown fields are errors), for KUBERNETES_VERSION."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (in the test extra)"
    )
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"]
    return []


def embedded_builtin_objects(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The Kubernetes objects inside a Ray object, wrapped as top-level objects for the schema check."""
    out = []
    for cluster in ray_clusters(doc):
        for name, template in pod_templates(cluster):
            out.append(
                (
                    f"{name} pod template",
                    {
                        "apiVersion": "v1",
                        "kind": "PodTemplate",
                        "metadata": {"name": name},
                        "template": template,
                    },
                )
            )
    service = doc["spec"].get("serveService")
    if service:
        svc = {"apiVersion": "v1", "kind": "Service", **copy.deepcopy(service)}
        svc.setdefault("metadata", {}).setdefault("name", "serve-svc")
        out.append(("serveService", svc))
    return out


# -- Serve configs --------------------------------------------------------------------------------


def serve_config_errors(config: Any, source: str) -> list[str]:
    """A Serve config file: ServeDeploySchema, then each specmoe application's args as a ServeConfig
    (extra keys forbidden) and their autoscaling configs as Serve's AutoscalingConfig."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        return [f"{source}: ServeDeploySchema: {e}"]
    apps = [a for a in config["applications"] if a.get("import_path") == APP_IMPORT_PATH]
    if not apps:
        return [f"{source}: no application with import_path {APP_IMPORT_PATH}"]
    errors = []
    for app in apps:
        try:
            cfg = ServeConfig.from_dict(app.get("args") or {}, source=f"{source}: {app['name']}")
        except ConfigError as e:
            errors.append(str(e))
            continue
        for field, auto in (
            ("draft_pool", cfg.draft_pool.autoscaling_config),
            ("verifier", cfg.verifier.autoscaling_config),
        ):
            if auto is None:
                continue
            # AutoscalingConfig ignores unknown keys: a misspelt max_replicas would go unnoticed.
            unknown = set(auto) - set(AutoscalingConfig.model_fields)
            if unknown:
                errors.append(f"{source}: {field}.autoscaling_config: unknown keys {sorted(unknown)}")
            try:
                AutoscalingConfig(**auto)
            except ValidationError as e:
                errors.append(f"{source}: {field}.autoscaling_config: {e}")
    return errors


def specmoe_app(config: dict[str, Any]) -> dict[str, Any]:
    [app] = [a for a in config["applications"] if a.get("import_path") == APP_IMPORT_PATH]
    return app


def rayservice_serve_config(docs: list[tuple[str, dict]] | None = None) -> dict[str, Any]:
    return yaml.safe_load(the("RayService", docs)["spec"]["serveConfigV2"])


def gpu_config() -> dict[str, Any]:
    with open(DEPLOYMENTS_DIR / "gpu.yaml") as f:
        return yaml.safe_load(f)


# -- the manifests together -----------------------------------------------------------------------


def _quantity(value: Any) -> float:
    s = str(value)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    return float(s)


def group_offers(group: dict[str, Any]) -> dict[str, float]:
    """Ray resources one pod of a worker group offers: CPU/GPU from the Ray container's limits, custom
    resources from the group's `resources` (what KubeRay passes to `ray start`)."""
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    offers = {"CPU": _quantity(limits.get("cpu", 0)), "GPU": _quantity(limits.get("nvidia.com/gpu", 0))}
    offers.update({k: _quantity(v) for k, v in (group.get("resources") or {}).items()})
    return offers


def capacity_errors(
    cluster: dict[str, Any], demands: list[tuple[str, dict[str, float], int]], where: str
) -> list[str]:
    """Each demand (name, resources of one unit, units) that names a custom resource must fit in the
    worker groups offering it, at their maxReplicas."""
    errors = []
    for name, unit, count in demands:
        custom = [k for k in unit if k not in ("CPU", "GPU", "memory")]
        groups = [
            g
            for g in cluster.get("workerGroupSpecs", [])
            if all(k in (g.get("resources") or {}) for k in custom)
        ]
        if not groups:
            errors.append(f"{where}: no worker group offers {custom} for the {name}")
            continue
        capacity = 0
        for g in groups:
            offers = group_offers(g)
            per_pod = min((int(offers.get(k, 0) // v) for k, v in unit.items() if v > 0), default=0)
            if per_pod == 0:
                errors.append(f"{where}: a {g['groupName']} pod ({offers}) cannot hold one {name} ({unit})")
            capacity += per_pod * g.get("maxReplicas", 0)
        if capacity < count:
            errors.append(
                f"{where}: {count} x {name} need more than the {capacity} that "
                f"{[g['groupName'] for g in groups]} hold at maxReplicas"
            )
    return errors


def serve_demands(cfg: ServeConfig) -> list[tuple[str, dict[str, float], int]]:
    def unit(opts: dict[str, Any]) -> dict[str, float]:
        return {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0), **opts.get("resources", {})}

    s = cfg.shards
    shard_gpus = s.num_gpus if s.num_gpus is not None else (1 if cfg.model.device == "cuda" else 0)
    demands = [("expert shard", {"CPU": s.num_cpus, "GPU": shard_gpus, **s.resources}, s.num_shards)]
    v = cfg.verifier
    demands.append(
        (
            "verifier replica",
            unit(v.ray_actor_options),
            (v.autoscaling_config or {}).get("max_replicas", v.num_replicas),
        )
    )
    dp = cfg.draft_pool
    if dp.placement == "pool":
        demands.append(
            (
                "draft replica",
                unit(dp.ray_actor_options),
                (dp.autoscaling_config or {}).get("max_replicas", dp.num_replicas),
            )
        )
    return demands


def secret_keys(docs: list[tuple[str, dict]]) -> dict[str, set[str]]:
    return {
        d["metadata"]["name"]: set(d.get("stringData") or {}) | set(d.get("data") or {})
        for _, d in docs
        if d["kind"] == "Secret"
    }


def reference_errors(docs: list[tuple[str, dict]]) -> list[str]:
    """Secrets, PVCs, Services and labels that one manifest names and another must provide."""
    errors = []
    secrets = secret_keys(docs)
    pvcs = {d["metadata"]["name"] for _, d in docs if d["kind"] == "PersistentVolumeClaim"}
    for file, doc in docs:
        for cluster in ray_clusters(doc):
            auth = cluster.get("authOptions") or {}
            if auth.get("mode") == "token" and "auth_token" not in secrets.get(auth.get("secretName"), set()):
                secret = auth.get("secretName")
                errors.append(f"{file}: authOptions.secretName {secret!r}: no Secret with key auth_token")
            head_params = cluster["headGroupSpec"].get("rayStartParams") or {}
            if head_params.get("num-cpus") != "0" or head_params.get("num-gpus") != "0":
                errors.append(f"{file}: the head must have num-cpus and num-gpus '0' (no work on the head)")
            for group, template in pod_templates(cluster):
                pod = template["spec"]
                for vol in pod.get("volumes", []):
                    claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
                    if claim is not None and claim not in pvcs:
                        errors.append(f"{file}: {group}: volume {vol['name']}: no PVC {claim!r}")
                for c in pod["containers"]:
                    for env in c.get("env", []):
                        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                        if ref and ref["key"] not in secrets.get(ref["name"], set()):
                            errors.append(
                                f"{file}: {group}: env {env['name']}: no Secret {ref['name']}/{ref['key']}"
                            )
                    gpus = (c.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu")
                    tolerated = any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
                    if gpus and not tolerated:
                        errors.append(f"{file}: {group}: GPU pods need a toleration for nvidia.com/gpu")
                    for m in c.get("volumeMounts", []):
                        if m["mountPath"] == "/models" and not m.get("readOnly"):
                            errors.append(f"{file}: {group}: /models must be mounted read-only")
    rs = the("RayService", docs)
    serve = rayservice_serve_config(docs)
    svc_name = ((rs["spec"].get("serveService") or {}).get("metadata") or {}).get(
        "name"
    ) or f"{rs['metadata']['name']}-serve-svc"
    for file, doc in docs:
        if doc["kind"] != "Ingress":
            continue
        for rule in doc["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                if (
                    backend["name"] != svc_name
                    or backend["port"].get("number") != serve["http_options"]["port"]
                ):
                    want = f"{svc_name}:{serve['http_options']['port']}"
                    errors.append(f"{file}: {path['path']} -> {backend}: expected {want}")
    return errors


def resource_errors(docs: list[tuple[str, dict]]) -> list[str]:
    """What the Serve config (and the batch job's driver) asks for fits the worker groups."""
    rs = the("RayService", docs)
    cfg = ServeConfig.from_dict(specmoe_app(rayservice_serve_config(docs))["args"])
    errors = capacity_errors(rs["spec"]["rayClusterConfig"], serve_demands(cfg), "RayService")
    job = the("RayJob", docs)
    m = re.search(r"--config\s+/app/(\S+)", job["spec"]["entrypoint"])
    if not m or not (ROOT / m.group(1)).is_file():
        return [
            *errors,
            f"RayJob: entrypoint {job['spec']['entrypoint']!r} must name a config under /app that exists",
        ]
    job_cfg = ServeConfig.from_yaml(str(ROOT / m.group(1)))
    driver = {"CPU": job["spec"].get("entrypointNumCpus", 0), "GPU": job["spec"].get("entrypointNumGpus", 0)}
    driver.update(json.loads(job["spec"].get("entrypointResources") or "{}"))
    demands = [d for d in serve_demands(job_cfg) if d[0] == "expert shard"] + [("job driver", driver, 1)]
    return errors + capacity_errors(job["spec"]["rayClusterSpec"], demands, "RayJob")


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def exposure_errors(docs: list[tuple[str, dict]]) -> list[str]:
    """Only port 8000 (any source) and 8265 (the KubeRay operator's namespace) are reachable from
    outside the namespace; ingress is denied by default; the policies select the pods they mean."""
    policies = [d for _, d in docs if d["kind"] == "NetworkPolicy"]
    errors = []
    if not any(
        p["spec"]["podSelector"] == {}
        and p["spec"].get("policyTypes") == ["Ingress"]
        and not p["spec"].get("ingress")
        for p in policies
    ):
        errors.append("no default-deny ingress policy (podSelector {}, policyTypes [Ingress], no rules)")
    open_ports: dict[int, list[str]] = {}
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            peers = rule.get("from")
            external = peers is None or any("namespaceSelector" in f or "ipBlock" in f for f in peers)
            if not external:
                continue
            ports = [x.get("port") for x in rule.get("ports", [])] or ["all ports"]
            for port in ports:
                source = "anywhere" if peers is None else json.dumps(peers, sort_keys=True)
                open_ports.setdefault(port, []).append(source)
    if open_ports.get(8000) != ["anywhere"]:
        errors.append(f"port 8000 must be open to any source by one rule, got {open_ports.get(8000)}")
    operator = open_ports.get(8265, [])
    if len(operator) != 1 or "kubernetes.io/metadata.name" not in operator[0]:
        errors.append(f"port 8265 must be open only to the operator's namespace, got {operator}")
    extra = sorted(str(p) for p in set(open_ports) - {8000, 8265})
    if extra:
        errors.append(f"ports reachable from outside the namespace: {extra} ({open_ports})")
    # The selectors must match the pods KubeRay makes from the templates (it adds ray.io/node-type).
    rs = the("RayService", docs)
    for p in policies:
        sel = p["spec"]["podSelector"]
        if sel == {}:
            continue
        matched = []
        for _, d in docs:
            if d["kind"] not in CRD_FILES:
                continue
            for cluster in ray_clusters(d):
                for name, t in pod_templates(cluster):
                    labels = {
                        **t["metadata"].get("labels", {}),
                        "ray.io/node-type": "head" if name == "head" else "worker",
                    }
                    if selects(sel, labels):
                        matched.append(f"{d['kind']}/{name}")
        if not matched:
            errors.append(f"NetworkPolicy {p['metadata']['name']} selects no Ray pod")
        if 8000 in [x.get("port") for r in p["spec"].get("ingress", []) for x in r.get("ports", [])]:
            want = {f"RayService/{n}" for n, _ in pod_templates(rs["spec"]["rayClusterConfig"])}
            if not want <= set(matched):
                errors.append(f"NetworkPolicy {p['metadata']['name']} misses {sorted(want - set(matched))}")
    return errors


# -- the tests ------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest():
    with open(K8S_DIR / "kustomization.yaml") as f:
        kustomization = yaml.safe_load(f)
    assert kustomization["namespace"] == NAMESPACE
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), listed
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk
    assert all((K8S_DIR / f).is_file() for f in listed)
    for file, doc in manifests():
        assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE, file


def test_crd_copies_carry_their_license():
    assert (CRD_DIR / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "feeaf72" in (CRD_DIR / "README.md").read_text()


@pytest.mark.parametrize(
    "index",
    range(len(_manifests())),
    ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in _manifests()],
)
def test_manifest_validates(index):
    _, doc = manifests()[index]
    if doc["apiVersion"].startswith("ray.io/"):
        assert crd_errors(doc) == []
        assert kuberay_errors(doc) == []
        for what, obj in embedded_builtin_objects(doc):
            assert builtin_errors(obj) == [], what
    else:
        assert builtin_errors(doc) == []


def test_every_kind_is_checked():
    kinds = {d["kind"] for _, d in manifests()}
    assert {"RayService", "RayJob", "PersistentVolumeClaim", "Secret", "NetworkPolicy", "Ingress"} <= kinds


@pytest.mark.parametrize("path", sorted(DEPLOYMENTS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_deployment_files_validate(path):
    with open(path) as f:
        config = yaml.safe_load(f)
    assert serve_config_errors(config, path.name) == []
    ServeConfig.from_yaml(str(path))  # the loader the CLI and app use


@pytest.mark.parametrize("path", sorted(DEPLOYMENTS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_deployment_files_build_a_serve_application(path):
    """Serve accepts the deployments' options (ray_actor_options, autoscaling, router) as built from the
    file; the checkpoint paths are swapped for the shipped demo pair, which exists everywhere."""
    from ray.serve import Application

    from specmoe_ray.serving import build_app

    cfg = ServeConfig.from_yaml(str(path))
    cfg.model.target = "demo-target"
    if cfg.model.draft not in (None, "ngram"):
        cfg.model.draft = "demo-draft"
    assert isinstance(build_app(cfg), Application)


def test_ray_objects_embed_valid_serve_configs():
    docs = manifests()
    configs = [
        (f, yaml.safe_load(d["spec"]["serveConfigV2"]))
        for f, d in docs
        if "serveConfigV2" in d.get("spec", {})
    ]
    assert configs
    for file, config in configs:
        assert serve_config_errors(config, file) == []


def test_rayservice_serves_deployments_gpu_yaml():
    assert rayservice_serve_config() == gpu_config()


def test_gpu_yaml_is_the_requested_layout():
    cfg = ServeConfig.from_yaml(str(DEPLOYMENTS_DIR / "gpu.yaml"))
    assert (cfg.model.target, cfg.model.draft) == ("/models/target", "/models/draft")
    assert (cfg.model.device, cfg.model.dtype) == ("cuda", "bfloat16")
    assert (cfg.shards.num_shards, cfg.shards.num_gpus, cfg.shards.strategy) == (4, 1, "SPREAD")
    assert cfg.draft_pool.placement == "pool"
    auto = cfg.draft_pool.autoscaling_config
    assert (auto["min_replicas"], auto["max_replicas"], cfg.draft_pool.ray_actor_options["num_gpus"]) == (
        1,
        4,
        1,
    )
    assert cfg.verifier.ray_actor_options["num_gpus"] == 1


def test_manifests_reference_each_other_consistently():
    assert reference_errors(manifests()) == []


def test_worker_groups_hold_what_the_serve_config_asks_for():
    assert resource_errors(manifests()) == []


def test_only_the_openai_port_is_public():
    assert exposure_errors(manifests()) == []


def test_rayservice_settings():
    spec = the("RayService")["spec"]
    cluster = spec["rayClusterConfig"]
    assert spec["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]
    assert cluster["authOptions"]["mode"] == "token"
    assert {g["groupName"] for g in cluster["workerGroupSpecs"]} == {
        "verifier",
        "draft-pool",
        "expert-shards",
    }
    for g in cluster["workerGroupSpecs"]:
        assert group_offers(g)["GPU"] >= 1, g["groupName"]
    job = the("RayJob")["spec"]
    assert (
        job["entrypoint"] == "specmoe batch /data/in.jsonl /data/out.jsonl --config /app/deployments/gpu.yaml"
    )
    assert job["shutdownAfterJobFinishes"] is True


# -- the VM cluster launcher config and the local scripts ----------------------------------------


LAUNCHER = ROOT / "cluster" / "launcher-gpu.yaml"


def launcher_errors(config: dict[str, Any]) -> list[str]:
    """The launcher's own validation (defaults filled in, ray-schema.json, node type rules), then the
    custom resources deployments/gpu.yaml asks for against the node types' max_workers."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (jsonschema.ValidationError, ValueError) as e:
        return [f"launcher config: {getattr(e, 'message', e)}"]
    errors = []
    cfg = ServeConfig.from_yaml(str(DEPLOYMENTS_DIR / "gpu.yaml"))
    types = config["available_node_types"]
    for name, unit, count in serve_demands(cfg):
        for key, amount in unit.items():
            if key in ("CPU", "GPU", "memory"):
                continue  # detected from the instance type when the cluster starts
            capacity = sum(
                t.get("max_workers", 0) * int(t["resources"].get(key, 0) // amount) for t in types.values()
            )
            if capacity < count:
                errors.append(
                    f"launcher: {count} x {name} need {key}: {amount} each; node types hold {capacity}"
                )
    return errors


def test_launcher_config_validates_and_fits_gpu_yaml():
    with open(LAUNCHER) as f:
        text = f.read()
    assert launcher_errors(yaml.safe_load(text)) == []
    assert "serve deploy deployments/gpu.yaml" in text


# fmt: off
LAUNCHER_BREAKAGES = [
    ("fractional resource", lambda c: c["available_node_types"]["verifier"]["resources"].update(verifier=0.5),
     "not of type 'integer'"),
    ("unknown top-level key", lambda c: c.update(head_start_commands=[]), "head_start_commands"),
    ("head type missing", lambda c: c.update(head_node_type="ray.head.gpu"), "head_node_type"),
    ("too few shard nodes", lambda c: c["available_node_types"]["expert_shard"].update(max_workers=3),
     "4 x expert shard"),
]
# fmt: on


@pytest.mark.parametrize("what,breakage,needle", LAUNCHER_BREAKAGES, ids=[b[0] for b in LAUNCHER_BREAKAGES])
def test_launcher_check_rejects(what, breakage, needle):
    with open(LAUNCHER) as f:
        config = yaml.safe_load(f)
    breakage(config)
    errors = launcher_errors(config)
    assert errors and any(needle in e for e in errors), errors


@pytest.mark.parametrize("script", ["start-local.sh", "stop-local.sh"])
def test_local_cluster_scripts_parse(script):
    import subprocess

    subprocess.run(["bash", "-n", str(ROOT / "cluster" / script)], check=True)


# -- the checks reject what they should ----------------------------------------------------------


def _walk(doc: Any, path: str) -> tuple[Any, str]:
    *parents, last = path.split("/")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node, last


def edit(doc: dict[str, Any], op: str, path: str, arg: Any = None) -> None:
    """set / rename / drop the field at path: "/"-separated keys and list indices."""
    node, last = _walk(doc, path)
    key = int(last) if isinstance(node, list) else last
    if op == "set":
        node[key] = arg
    elif op == "rename":
        node[arg] = node.pop(key)
    elif op == "drop":
        node.pop(key)


RC = "spec/rayClusterConfig"
WG = f"{RC}/workerGroupSpecs"
JOB_WG = "spec/rayClusterSpec/workerGroupSpecs"
BACKEND = "spec/rules/0/http/paths/0/backend/service"

# (what, kind, op, path, arg, a word the error must contain)
# fmt: off
CRD_BREAKAGES = [
    ("maxReplicas as a string", "RayService", "set", f"{WG}/2/maxReplicas", "8", "maxReplicas"),
    ("rayStartParams value not a string", "RayService",
     "set", f"{RC}/headGroupSpec/rayStartParams/num-cpus", 0, "num-cpus"),
    ("misspelt field under spec", "RayService", "rename", "spec/serveConfigV2", "serveConfigv2", "Configv2"),
    ("misspelt group field", "RayService", "rename", f"{WG}/0/minReplicas", "minReplica", "minReplica"),
    ("no groupName", "RayService", "drop", f"{WG}/1/groupName", None, "groupName"),
    ("no rayClusterConfig", "RayService", "drop", RC, None, "rayClusterConfig"),
    ("unknown auth mode", "RayService", "set", f"{RC}/authOptions/mode", "tokens", "tokens"),
    ("pod spec typo", "RayJob", "rename", f"{JOB_WG}/0/template/spec/tolerations", "toleration", "tolerat"),
    ("entrypoint not a string", "RayJob", "set", "spec/entrypoint", ["specmoe", "batch"], "entrypoint"),
]
# fmt: on


@pytest.mark.parametrize("what,kind,op,path,arg,needle", CRD_BREAKAGES, ids=[b[0] for b in CRD_BREAKAGES])
def test_crd_check_rejects(what, kind, op, path, arg, needle):
    doc = the(kind)
    edit(doc, op, path, arg)
    errors = crd_errors(doc)
    assert errors and any(needle in e for e in errors), errors


# fmt: off
KUBERAY_BREAKAGES = [
    ("minReplicas > maxReplicas", "RayService", "set", f"{WG}/1/minReplicas", 9, "minReplicas 9 > max"),
    ("token auth on an old Ray", "RayService", "set", f"{RC}/rayVersion", "2.40.0", "2.52.0"),
    ("unknown upgrade strategy", "RayService", "set", "spec/upgradeStrategy/type", "BlueGreen", "BlueGreen"),
    ("name too long", "RayService", "set", "metadata/name", "s" * 48, "DNS-1035"),
    ("resources given twice", "RayService", "set", f"{WG}/0/rayStartParams", {"num-gpus": "1"}, "both in"),
    ("suspended, never shut down", "RayJob", "set", "spec/shutdownAfterJobFinishes", False, "shutdownAfter"),
]
# fmt: on


@pytest.mark.parametrize(
    "what,kind,op,path,arg,needle", KUBERAY_BREAKAGES, ids=[b[0] for b in KUBERAY_BREAKAGES]
)
def test_kuberay_check_rejects(what, kind, op, path, arg, needle):
    doc = the(kind)
    edit(doc, op, path, arg)
    assert crd_errors(doc) == []  # schema-valid: only the operator's own rules catch these
    errors = kuberay_errors(doc)
    assert any(needle in e for e in errors), errors


# fmt: off
BUILTIN_BREAKAGES = [
    ("misspelt policyTypes", "NetworkPolicy", "rename", "spec/policyTypes", "policyType", "policyType"),
    ("port as a word", "Ingress", "set", f"{BACKEND}/port/number", "eight", "eight"),
    ("misspelt requests", "PersistentVolumeClaim", "rename", "spec/resources/requests", "request", "request"),
    ("stringData not a map", "Secret", "set", "stringData", ["auth_token"], "auth_token"),
]
# fmt: on


@pytest.mark.parametrize(
    "what,kind,op,path,arg,needle", BUILTIN_BREAKAGES, ids=[b[0] for b in BUILTIN_BREAKAGES]
)
def test_builtin_check_rejects(what, kind, op, path, arg, needle):
    doc = next(d for _, d in manifests() if d["kind"] == kind)
    assert builtin_errors(doc) == []
    edit(doc, op, path, arg)
    errors = builtin_errors(doc)
    assert errors and any(needle in e for e in errors), errors


def test_builtin_check_rejects_a_bad_embedded_pod_template():
    doc = the("RayService")
    edit(doc, "set", f"{WG}/0/template/spec/containers/0/resources/limits/cpu", {"cores": 8})
    errors = [e for _, obj in embedded_builtin_objects(doc) for e in builtin_errors(obj)]
    assert errors and any("cores" in e for e in errors), errors


def _serve_config_with(mutate) -> dict[str, Any]:
    config = rayservice_serve_config()
    mutate(specmoe_app(config)["args"], config)
    return config


SERVE_BREAKAGES = [
    ("unknown key in the ServeConfig args", lambda a, c: a["shards"].update(num_shard=4), "num_shard"),
    ("misspelt section", lambda a, c: a.update(draftpool=a.pop("draft_pool")), "draftpool"),
    ("wrong type in the args", lambda a, c: a["engine"].update(max_num_seqs="many"), "max_num_seqs"),
    ("unknown device", lambda a, c: a["model"].update(device="tpu"), "device"),
    (
        "misspelt autoscaling key",
        lambda a, c: a["draft_pool"]["autoscaling_config"].update(max_replica=8),
        "max_replica",
    ),
    (
        "autoscaling min > max",
        lambda a, c: a["draft_pool"]["autoscaling_config"].update(min_replicas=5),
        "max_replicas",
    ),
    ("bad Serve option", lambda a, c: c.update(proxy_location="Everywhere"), "proxy_location"),
    (
        "another import path",
        lambda a, c: c["applications"][0].update(import_path="other:app"),
        "no application",
    ),
]


@pytest.mark.parametrize("what,mutate,needle", SERVE_BREAKAGES, ids=[b[0] for b in SERVE_BREAKAGES])
def test_serve_config_check_rejects(what, mutate, needle):
    errors = serve_config_errors(_serve_config_with(mutate), "serveConfigV2")
    assert errors and any(needle in e for e in errors), errors


def test_equality_check_notices_a_drift():
    docs = manifests()
    rs = the("RayService", docs)
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    specmoe_app(config)["args"]["engine"]["num_speculative_tokens"] = 5
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    assert rayservice_serve_config(docs) != gpu_config()


def _policy(docs: list[tuple[str, dict]], name: str) -> dict[str, Any]:
    return next(d for _, d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == name)


def _drop(docs: list[tuple[str, dict]], name: str) -> None:
    docs.remove(next((f, d) for f, d in docs if d["metadata"]["name"] == name))


API, SAME_NS = "specmoe-allow-openai-api", "specmoe-allow-same-namespace"
JOB_VOLUMES = "spec/rayClusterSpec/headGroupSpec/template/spec/volumes"
MOUNT0 = "template/spec/containers/0/volumeMounts/0"


def _select_web(docs: list[tuple[str, dict]]) -> None:
    _policy(docs, API)["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] = "web"


def _open_everything(docs: list[tuple[str, dict]]) -> None:
    _policy(docs, SAME_NS)["spec"]["ingress"][0]["from"].append({"ipBlock": {"cidr": "10.0.0.0/8"}})


# fmt: off
CROSS_BREAKAGES = [
    ("shards beyond maxReplicas", resource_errors,
     lambda docs: edit(the("RayService", docs), "set", f"{WG}/2/maxReplicas", 3), "4 x expert shard"),
    ("no group offers the draft resource", resource_errors,
     lambda docs: edit(the("RayService", docs), "set", f"{WG}/1/resources", {"drafts": "1"}),
     "offers ['draft']"),
    ("job driver asks for 2 GPUs", resource_errors,
     lambda docs: edit(the("RayJob", docs), "set", "spec/entrypointNumGpus", 2), "job driver"),
    ("no token Secret", reference_errors,
     lambda docs: edit(the("RayService", docs), "set", f"{RC}/authOptions/secretName", "nope"), "auth_token"),
    ("no API key Secret", reference_errors,
     lambda docs: _drop(docs, "specmoe-api-key"), "specmoe-api-key/api_key"),
    ("no such PVC", reference_errors,
     lambda docs: edit(the("RayJob", docs), "set", f"{JOB_VOLUMES}/1/persistentVolumeClaim/claimName", "x"),
     "no PVC"),
    ("ingress to another service", reference_errors,
     lambda docs: edit(the("Ingress", docs), "set", f"{BACKEND}/name", "x"),
     "expected specmoe-serve-svc"),
    ("writable models", reference_errors,
     lambda docs: edit(the("RayService", docs), "set", f"{WG}/0/{MOUNT0}/readOnly", False), "read-only"),
    ("work on the head", reference_errors,
     lambda docs: edit(the("RayService", docs), "set", f"{RC}/headGroupSpec/rayStartParams/num-cpus", "4"),
     "num-cpus"),
    ("dashboard opened to everyone", exposure_errors,
     lambda docs: _policy(docs, API)["spec"]["ingress"][0]["ports"].append({"port": 8265}), "8265"),
    ("everything opened to an address block", exposure_errors, _open_everything, "all ports"),
    ("no default deny", exposure_errors,
     lambda docs: _drop(docs, "specmoe-default-deny-ingress"), "default-deny"),
    ("API policy selects no pod", exposure_errors, _select_web, "selects no Ray pod"),
]
# fmt: on


@pytest.mark.parametrize("what,check,breakage,needle", CROSS_BREAKAGES, ids=[b[0] for b in CROSS_BREAKAGES])
def test_cross_checks_reject(what, check, breakage, needle):
    docs = manifests()
    assert check(docs) == []
    breakage(docs)
    errors = check(docs)
    assert errors and any(needle in e for e in errors), errors
