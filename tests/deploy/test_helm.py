"""The Helm chart, checked offline as CI does: helm lint --strict, helm template for each
values file, the manifests against Kubernetes schemas (kubernetes-validate) and the
prometheus-operator CRD models, and what the templates must guarantee."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as monitoring

from apirouter.config import SETTINGS, parse_config
from tests.harness import ROOT

CHART = ROOT / "deploy" / "helm" / "apirouter"
BIN = Path(sys.executable).parent  # the venv tools/setup.sh made: helm, kubernetes-validate
HELM = BIN / "helm"
VALUES = ("values.yaml", "values-staging.yaml", "values-production.yaml")
CHART_DEFAULTS = {"bind": "0.0.0.0:8080", "spool_dir": "/var/spool/apirouter"}
K8S_VERSION = "1.30.0"


def helm(*args: str) -> str:
    assert HELM.exists(), "helm is missing: tools/setup.sh test unpacks it into .venv/bin"
    done = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60,
                          cwd=CHART)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module", params=VALUES)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[str, Path, list[dict[str, Any]]]]:
    out = helm("template", "rel", ".", "-f", request.param)
    path = tmp_path_factory.mktemp("helm") / f"{request.param}.rendered.yaml"
    path.write_text(out)
    yield request.param, path, [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_lint_strict_for_every_values_file() -> None:
    for values in VALUES:
        assert "0 chart(s) failed" in helm("lint", "--strict", "-f", values, ".")


def test_lint_fails_on_a_broken_template(tmp_path: Path) -> None:
    broken = tmp_path / "apirouter"
    subprocess.run(["cp", "-r", str(CHART), str(broken)], check=True)
    (broken / "templates" / "service.yaml").write_text("{{ .Values.service.port | nope }}\n")
    done = subprocess.run([str(HELM), "lint", "--strict", str(broken)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0


def test_manifests_validate_against_kubernetes_schemas(rendered: Any) -> None:
    name, path, docs = rendered
    done = subprocess.run([str(BIN / "kubernetes-validate"), "--strict",
                           "-k", K8S_VERSION, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            model = getattr(monitoring, d["kind"]).model_validate(d)
            # The models ignore unknown fields; a round trip that loses one is a typo.
            assert model.model_dump(by_alias=True, exclude_none=True, mode="json") == d


def test_every_setting_has_its_default_in_values_yaml() -> None:
    server = yaml.safe_load((CHART / "values.yaml").read_text())["config"]["server"]
    assert list(server) == [s.name for s in SETTINGS]
    for s in SETTINGS:
        assert server[s.name] == CHART_DEFAULTS.get(s.name, s.default), s.name
    text = (CHART / "values.yaml").read_text()
    for s in SETTINGS:
        assert f"# {s.doc}" in text, f"{s.name}: its doc line is missing from values.yaml"


def test_config_map_is_a_valid_router_config(rendered: Any) -> None:
    name, _, docs = rendered
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if "router.yaml" in d["data"]]
    cfg = parse_config(yaml.safe_load(cm["data"]["router.yaml"]), env={})
    assert cfg.server.bind == "0.0.0.0:8080"
    if name == "values-staging.yaml":
        assert cfg.server.redis_url and cfg.server.kafka_bootstrap and cfg.models


def test_deployment_runs_safely_and_drains(rendered: Any) -> None:
    name, _, docs = rendered
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    server = values["config"]["server"]
    (dep,) = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] > server["graceful_timeout_s"] + 5
    assert c["livenessProbe"]["httpGet"]["path"] == "/v1/status/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v1/status/readyz"
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = volumes["shm"]["emptyDir"]
    expected_mib = (2 * server["table_slot_bytes"] + values["shm"]["ringSlots"]
                    * server["usage_ring_bytes"]) // (1 << 20) + values["shm"]["headroomMiB"]
    assert shm == {"medium": "Memory", "sizeLimit": f"{expected_mib}Mi"}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for writable in ("/dev/shm", "/run/apirouter", "/tmp", "/var/spool/apirouter"):
        assert not mounts[writable].get("readOnly"), writable
    assert mounts["/etc/apirouter"]["readOnly"] is True
    assert "--bind=0.0.0.0:8080" in c["args"]
    env = {e["name"] for e in c["env"]}
    if name == "values-production.yaml":
        assert "--etcd=etcd.platform.svc:2379" in c["args"]
        assert {"APIROUTER_ADMIN_TOKEN_SHA256", "APIROUTER_REDIS_URL",
                "APIROUTER_KAFKA_BOOTSTRAP"} <= env
        assert "ephemeral" in volumes["spool"]
    else:
        assert "--config=/etc/apirouter/router.yaml" in c["args"]


def test_kinds_per_environment(rendered: Any) -> None:
    name, _, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ServiceAccount", "ConfigMap",
            "HorizontalPodAutoscaler"} <= kinds
    assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"} & kinds
    if name == "values-production.yaml":
        assert {"PrometheusRule", "ServiceMonitor", "Ingress", "PodDisruptionBudget"} <= kinds
        (rule,) = by_kind(docs, "PrometheusRule")
        alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
        assert [r["alert"] for r in rule["spec"]["groups"][0]["rules"]] == [
            r["alert"] for r in alerts["groups"][0]["rules"]]
        (sm,) = by_kind(docs, "ServiceMonitor")
        assert sm["spec"]["jobLabel"] == "app.kubernetes.io/name"
    if name == "values.yaml":
        assert not {"PrometheusRule", "ServiceMonitor", "Ingress"} & kinds
