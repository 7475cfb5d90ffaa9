"""TLS and mTLS with real certificates made in the test: a CA, server and client certificates.

Each refusal is checked for what a user needs: it happens at connect, quickly, and says what to
change. Peers are checked over mTLS with the daemons' own certificates.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time

import pytest

from kvstore.bench.certs import CertificateAuthority
from kvstore.client import KVClient
from kvstore.config import PeerConfig
from kvstore.errors import ConfigError, UnavailableError
from kvstore.server.process import free_ports
from kvstore.server.server import KVStoreServer
from kvstore.tier_kind import TierKind
from kvstore.tls import TlsConfig

from conftest import chain, make_config, random_blocks


@pytest.fixture
def pki(tmp_path):
    """A CA with a server and a client certificate, and a second CA that signed neither."""
    ca = CertificateAuthority(tmp_path / "ca")
    other = CertificateAuthority(tmp_path / "other", name="someone else's CA")

    class Pki:
        pass

    p = Pki()
    p.ca, p.other = ca, other
    p.server = ca.issue("server")
    p.client = ca.issue("client", server=False)
    p.stranger = other.issue("stranger", server=False)
    return p


def tls_server(pki, *, mutual: bool = False, **overrides):
    tls = TlsConfig(cert=str(pki.server.cert), key=str(pki.server.key), client_ca=str(pki.ca.cert) if mutual else "")
    return KVStoreServer(make_config(tls=tls, **overrides))


async def round_trip(target: str, **client) -> None:
    keys, blocks = chain(4, seed=int.from_bytes(os.urandom(4), "little")), random_blocks(4, 64 << 10)
    async with KVClient(target, **client) as kv:
        assert (await kv.put(keys, blocks)).stored == 4
        assert await kv.get(keys) == blocks
        assert (await kv.lookup(keys)).count == 4


async def refused(target: str, **client) -> str:
    """Connecting fails at once (well before the connect timeout) with an UnavailableError."""
    start = time.monotonic()
    with pytest.raises(UnavailableError) as info:
        async with KVClient(target, connect_timeout_s=10.0, local="off", **client):
            pass
    assert time.monotonic() - start < 5.0, "a TLS mistake must not wait out the connect timeout"
    return str(info.value)


@pytest.mark.parametrize("local", ["off", "auto"])
async def test_tls_round_trip_on_both_data_paths(pki, local):
    async with tls_server(pki) as server:
        await round_trip(server.address, tls_ca=str(pki.ca.cert), local=local)


async def test_mtls_round_trip_with_a_client_certificate(pki):
    async with tls_server(pki, mutual=True) as server:
        await round_trip(
            server.address, tls_ca=str(pki.ca.cert), tls_cert=str(pki.client.cert), tls_key=str(pki.client.key),
            local="off",
        )


async def test_a_plaintext_client_is_refused_and_told_to_use_tls(pki):
    async with tls_server(pki) as server:
        assert "requires TLS" in await refused(server.address)


async def test_a_client_trusting_another_ca_is_refused(pki):
    async with tls_server(pki) as server:
        message = await refused(server.address, tls_ca=str(pki.other.cert))
        assert "not trusted by the CA in tls_ca" in message


async def test_mtls_refuses_a_client_without_a_certificate_and_one_signed_by_another_ca(pki):
    async with tls_server(pki, mutual=True) as server:
        assert "requires a client certificate" in await refused(server.address, tls_ca=str(pki.ca.cert))
        message = await refused(
            server.address, tls_ca=str(pki.ca.cert), tls_cert=str(pki.stranger.cert), tls_key=str(pki.stranger.key)
        )
        assert "refused this client's" in message


async def test_a_tls_client_against_a_plaintext_daemon_is_told_so(pki):
    async with KVStoreServer(make_config()) as server:
        assert "does not speak TLS" in await refused(server.address, tls_ca=str(pki.ca.cert))


async def test_the_server_name_is_checked_and_can_be_overridden(tmp_path):
    ca = CertificateAuthority(tmp_path)
    cert = ca.issue("node-a.example", loopback=False)   # names only the node, not 127.0.0.1
    async with KVStoreServer(make_config(tls=TlsConfig(cert=str(cert.cert), key=str(cert.key)))) as server:
        assert "does not name" in await refused(server.address, tls_ca=str(ca.cert))
        await round_trip(server.address, tls_ca=str(ca.cert), tls_server_name="node-a.example", local="off")


async def test_a_renewed_certificate_is_served_without_a_restart(tmp_path):
    old_ca, new_ca = CertificateAuthority(tmp_path / "old"), CertificateAuthority(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    old = old_ca.issue("server")
    cert, key = live / "tls.crt", live / "tls.key"
    shutil.copy(old.cert, cert)
    shutil.copy(old.key, key)
    async with KVStoreServer(make_config(tls=TlsConfig(cert=str(cert), key=str(key)))) as server:
        await round_trip(server.address, tls_ca=str(old_ca.cert), local="off")
        assert "not trusted" in await refused(server.address, tls_ca=str(new_ca.cert))
        # A broken renewal (the new certificate with the old key) is not taken...
        new = new_ca.issue("server")
        _replace(cert, new.cert)
        await round_trip(server.address, tls_ca=str(old_ca.cert), local="off")
        assert server.certificates.reloads == 0
        # ...the key arriving completes it, and the next connection gets the new certificate.
        _replace(key, new.key)
        await round_trip(server.address, tls_ca=str(new_ca.cert), local="off")
        assert server.certificates.reloads == 1 and server.daemon.counters.tls_reloads == 1
        assert "not trusted" in await refused(server.address, tls_ca=str(old_ca.cert))


def _replace(path, source) -> None:
    tmp = path.with_name(path.name + ".new")
    shutil.copy(source, tmp)
    os.replace(tmp, path)


async def test_peers_talk_over_mtls_with_their_own_certificates(pki):
    ports = free_ports(2)
    members = tuple(f"127.0.0.1:{p}" for p in ports)
    tls = TlsConfig(cert=str(pki.server.cert), key=str(pki.server.key), client_ca=str(pki.ca.cert))
    servers = []
    try:
        for port in ports:
            config = make_config(port=port, local_socket="off", tls=tls,
                                 peer=PeerConfig(peers=members, backoff_s=0.2, transfer="auto"))
            servers.append(KVStoreServer(config))
            await servers[-1].start()
        client = dict(tls_ca=str(pki.ca.cert), tls_cert=str(pki.client.cert), tls_key=str(pki.client.key), local="off")
        keys, blocks = chain(16, seed=9), random_blocks(16, 32 << 10)
        async with KVClient(servers[0].address, **client) as kv:
            assert (await kv.put(keys, blocks)).stored == 16
        async with KVClient(servers[1].address, **client) as kv:
            deadline = time.monotonic() + 10
            while (hit := await kv.lookup(keys)).count < 16 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert hit.count == 16
            assert await kv.get(keys) == blocks
        assert TierKind.PEER in hit.tiers   # blocks whose home is the first daemon came over mTLS
        peer = next(t for t in servers[1].daemon.stack.tiers if t.name == "peer")
        assert peer.nixl is None, "with TLS on, block bytes must not take the unencrypted NIXL path by default"
    finally:
        for server in servers:
            await server.stop()


def test_tls_settings_that_do_not_go_together_are_refused():
    with pytest.raises(ConfigError, match="tls.cert and tls.key"):
        TlsConfig(cert="a.pem")
    with pytest.raises(ConfigError, match="tls.client_ca needs TLS on"):
        TlsConfig(client_ca="ca.pem")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tls-cert", "{dir}/server.pem"], "tls.cert and tls.key go together"),
        (["--tls-cert", "{dir}/missing.pem", "--tls-key", "{dir}/server-key.pem"], "tls.cert: cannot read"),
        (["--tls-cert", "{dir}/server.pem", "--tls-key", "{dir}/client-key.pem"], "tls.key is not the private key"),
        (["--tls-cert", "{dir}/server.pem", "--tls-key", "{dir}/server-key.pem", "--tls-client-ca", "{dir}/server-key.pem"],
         "tls.client_ca: not a PEM CA bundle"),
        (["--tls-cert", "{dir}/server.pem", "--tls-key", "{dir}/server-key.pem", "--tls-client-ca", "{dir}/client.pem"],
         "tls.client_ca: holds no CA certificate"),
    ],
)
def test_bad_tls_flags_are_one_line_and_exit_status_2(pki, flags, message):
    directory = pki.ca.directory
    argv = [a.format(dir=directory) for a in flags]
    result = subprocess.run(
        [sys.executable, "-m", "kvstore.server.cli", "serve", "--port", "0", "--metrics-port", "0", "--nvme-dir", "off",
         "--dram-bytes", "16MiB", "--local-socket", "off", *argv],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


async def test_kvstore_stats_speaks_tls(pki):
    async with tls_server(pki, mutual=True) as server:
        base = [sys.executable, "-m", "kvstore.server.cli", "stats", "--target", server.address, "--json"]
        mtls = ["--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
        ok, plain = await asyncio.gather(
            asyncio.to_thread(subprocess.run, [*base, *mtls], capture_output=True, text=True, timeout=60),
            asyncio.to_thread(subprocess.run, base, capture_output=True, text=True, timeout=60),
        )
    assert ok.returncode == 0 and '"version"' in ok.stdout, ok.stderr
    assert plain.returncode == 2 and "requires TLS" in plain.stderr


async def test_with_tls_the_metrics_endpoint_is_https_too(pki):
    import ssl
    import urllib.error
    import urllib.request

    async with tls_server(pki, metrics_port=_free_port()) as server:
        url = f"https://127.0.0.1:{server.metrics_port}/metrics"
        context = ssl.create_default_context(cafile=str(pki.ca.cert))
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, context=context, timeout=10).read())
        assert b"kvstore_tls_reloads_total" in body
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read()
            )


def _free_port() -> int:
    return free_ports(1)[0]


def test_an_engine_connector_link_reaches_a_daemon_with_mtls_and_tenants(pki, tmp_path, monkeypatch):
    """The link every engine connector uses: TLS paths and a token file in its options."""
    from conftest import DaemonThread

    from kvstore.integrations.link import DaemonLink, LinkConfig
    from kvstore.tenants import hash_token

    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[[tenant]]\nname = "engine"\ntoken_sha256 = ["{hash_token("engine-token")}"]\n')
    token_file = tmp_path / "token"
    token_file.write_text("engine-token\n")
    tls = TlsConfig(cert=str(pki.server.cert), key=str(pki.server.key), client_ca=str(pki.ca.cert))
    daemon = DaemonThread(make_config(tls=tls, tenants=str(tenants))).start()
    monkeypatch.delenv("KVSTORE_TOKEN", raising=False)
    try:
        options = dict(address=daemon.address, tls_ca=str(pki.ca.cert), tls_cert=str(pki.client.cert),
                       tls_key=str(pki.client.key), token_file=str(token_file))
        link = DaemonLink(LinkConfig(**options), namespace=b"engine-ns", owner="test")
        try:
            assert link.wait_connected(15)
            keys, blocks = chain(3, seed=60), random_blocks(3, 4096)
            assert link.call("put", lambda kv: kv.put(keys, blocks), None).stored == 3
            assert link.call("lookup", lambda kv: kv.lookup(keys), None).count == 3
            assert link.path == "local"   # a window of the engine's own
        finally:
            link.close()
        without = DaemonLink(LinkConfig(**{**options, "token_file": ""}), namespace=b"engine-ns", owner="test")
        try:
            assert not without.wait_connected(3)   # refused: its calls are misses, never errors
            assert without.call("lookup", lambda kv: kv.lookup(keys), "miss") == "miss"
        finally:
            without.close()
    finally:
        daemon.stop()
