"""The Kubernetes manifests of docs/deploy.md: valid against the Kubernetes schemas (kubernetes-validate,
strict: an unknown field is an error) and consistent with the service they run.

Checked against the code rather than restated: the probe paths are routes the service answers, the
container port is the one BentoML's image exposes, the user is the image's, every ``PROMPTBAKE_*``
variable is a setting the service reads, the grace period outlasts the request timeout, the Service
and the autoscaler point at the Deployment.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES = "1.30.0"  # a version current clusters run; the schemas ship with kubernetes-validate


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _known_variables() -> set[str]:
    from service.config import ENV_PREFIX, ServiceConfig

    # read by service/service.py itself, before a ServiceConfig exists (BentoML's own settings)
    return {ENV_PREFIX + f.upper() for f in ServiceConfig.model_fields} | {"PROMPTBAKE_WORKERS", "PROMPTBAKE_TIMEOUT_S"}


def test_there_are_manifests_and_docs_name_them():
    assert [p.name for p in MANIFESTS] == ["promptbake-mounted-artifact.yaml", "promptbake.yaml"]
    docs = (REPO / "docs" / "deploy.md").read_text()
    assert all(f"deploy/kubernetes/{p.name}" in docs for p in MANIFESTS)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schemas(path):
    import kubernetes_validate

    for doc in _documents(path):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_a_wrong_field_is_caught():
    """The validation above can fail: a misspelt probe field is refused."""
    import kubernetes_validate

    doc = _documents(REPO / "deploy" / "kubernetes" / "promptbake.yaml")[0]
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/livez", "port": 3000}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_match_the_service(path):
    from service.http import HEALTH_PATHS

    docs = _documents(path)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert deployments
    known = _known_variables()
    for dep in deployments:
        pod = dep["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1034
        assert spec["terminationGracePeriodSeconds"] > 60  # PROMPTBAKE_TIMEOUT_S's default
        (container,) = spec["containers"]
        assert [p["containerPort"] for p in container["ports"]] == [3000]  # EXPOSE 3000 in BentoML's image
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in container:
                assert container[probe]["httpGet"]["path"] in HEALTH_PATHS, probe
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        names = {e["name"] for e in container.get("env", [])}
        assert names <= known, f"variables the service does not read: {sorted(names - known)}"
        for service in (d for d in docs if d["kind"] == "Service"):
            if service["metadata"]["name"] == dep["metadata"]["name"]:
                assert service["spec"]["selector"].items() <= labels.items()
        for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
            assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                     "name": dep["metadata"]["name"]}
        if "nvidia.com/gpu" in container["resources"].get("limits", {}):
            # an extended resource: requests, when given, must equal limits
            assert container["resources"]["requests"].get("nvidia.com/gpu", container["resources"]["limits"]["nvidia.com/gpu"]) \
                == container["resources"]["limits"]["nvidia.com/gpu"]
