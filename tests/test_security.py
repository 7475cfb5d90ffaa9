"""What the daemon keeps to itself: private files on disk, a socket directory of its own, the
same-host socket admitting only the users it names, and requests that cannot make it announce
more than they asked for.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys

import pytest

from kvstore.client import KVClient
from kvstore.config import NvmeConfig
from kvstore.errors import ConfigError, InvalidArgumentError
from kvstore.server.server import KVStoreServer

from conftest import chain, make_config, random_blocks

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creating users and running as them needs root")
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("engine", ["posix", "auto"])
async def test_the_nvme_directory_and_every_file_in_it_are_private(tmp_path, engine):
    os.umask(0o022)
    directory = tmp_path / "nvme"
    config = make_config(nvme=NvmeConfig(dir=str(directory), capacity_bytes=16 << 20, io_engine=engine),
                         write_through=True)
    async with KVStoreServer(config) as server:
        async with KVClient(server.address, local="off") as kv:
            await kv.put(chain(4, seed=1), random_blocks(4, 8192))
    assert mode(directory) == 0o700
    files = [p for p in directory.rglob("*")]
    assert any(p.name == "data.mdb" for p in files) and any(p.name == "blocks.dat" for p in files)
    for path in files:
        assert mode(path) == (0o700 if path.is_dir() else 0o600), f"{path} is {oct(mode(path))}"


async def test_an_nvme_directory_left_open_by_an_older_version_is_closed_at_start(tmp_path):
    directory = tmp_path / "nvme"
    config = make_config(nvme=NvmeConfig(dir=str(directory), capacity_bytes=16 << 20))
    async with KVStoreServer(config):
        pass
    os.chmod(directory, 0o755)
    for path in directory.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    async with KVStoreServer(config):
        assert mode(directory) == 0o700
        assert all(mode(p) == (0o700 if p.is_dir() else 0o600) for p in directory.rglob("*"))


async def test_the_default_socket_lives_in_a_private_directory_of_the_daemons_user(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    async with KVStoreServer(make_config(local_socket="auto")) as server:
        path = server.config.local_socket_path(server.port)
        assert os.path.dirname(path) == str(tmp_path / "kvstore")
        assert mode(os.path.dirname(path)) == 0o700 and mode(path) == 0o600
        async with KVClient(server.address) as kv:
            assert kv.path == "local"


async def test_a_socket_directory_of_another_user_or_a_symlink_is_refused(tmp_path):
    if os.geteuid() == 0:
        for mode_bits in (0o777, 0o755):   # its owner can rename the socket whatever the mode
            theirs = tmp_path / f"theirs-{mode_bits:o}"
            theirs.mkdir()
            os.chmod(theirs, mode_bits)
            os.chown(theirs, 12345, 12345)
            with pytest.raises(ConfigError, match="its owner could replace the socket"):
                async with KVStoreServer(make_config(local_socket=str(theirs / "kv.sock"))):
                    pass
    mine = tmp_path / "mine"
    mine.mkdir()
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(ConfigError, match="not a directory"):
        async with KVStoreServer(make_config(local_socket=str(link / "kv.sock"))):
            pass


async def test_a_client_refuses_a_socket_served_by_another_user(tmp_path):
    """The daemon tells the client its uid; a listener of another uid is not the daemon."""
    import socket

    from kvstore.client.local import LocalArena

    path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    try:
        with pytest.raises(ValueError, match="not the daemon's"):
            LocalArena.open(path, "x", 4096, timeout_s=2, daemon_uid=os.geteuid() + 1)
    finally:
        listener.close()


def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
        return pwd.getpwnam(name)


HELLO = """
import json, socket, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(sys.argv[1])
data, fds, _, _ = socket.recv_fds(conn, 65536, 1)
hello = json.loads(data[4:4 + int.from_bytes(data[:4], "little")])
print(json.dumps({"fds": len(fds), "error": hello.get("error")}))
"""


@needs_root
@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="no system python3 for the other users to run")
async def test_the_socket_serves_only_the_uids_it_admits():
    import tempfile
    from pathlib import Path

    admitted, stranger = _user("kvstore-test-admitted"), _user("kvstore-test-stranger")
    top = Path(tempfile.mkdtemp(prefix="kvstore-peercred-"))   # pytest's tmp_path is root's own (0700)
    os.chmod(top, 0o755)
    path = top / "sock" / "kv.sock"
    try:
        await _serve_two_users(path, admitted, stranger)
    finally:
        shutil.rmtree(top, ignore_errors=True)


async def _serve_two_users(path, admitted, stranger) -> None:
    async with KVStoreServer(make_config(local_socket=str(path), local_socket_uids=(admitted.pw_uid,))) as server:

        def hello_as(user: pwd.struct_passwd) -> dict:
            result = subprocess.run([SYSTEM_PYTHON, "-c", HELLO, str(path)], user=user.pw_uid, group=user.pw_gid,
                                    capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        import asyncio

        ok, refused = await asyncio.gather(asyncio.to_thread(hello_as, admitted), asyncio.to_thread(hello_as, stranger))
        assert ok == {"fds": 1, "error": None}
        assert refused["fds"] == 0 and f"uid {stranger.pw_uid}" in refused["error"]
        assert server.daemon.counters.local_refused == 1


async def test_a_get_that_repeats_a_key_is_refused(server):
    keys = chain(2, seed=4)
    async with KVClient(server.address, local="off") as kv:
        await kv.put(keys, random_blocks(2, 4096))
        with pytest.raises(InvalidArgumentError, match="repeat"):
            await kv.get([keys[0]] * 1000)


async def test_a_get_announces_at_most_max_get_bytes_and_the_client_reads_the_rest_in_rounds():
    async with KVStoreServer(make_config(max_get_bytes=64 << 10)) as server:
        keys, blocks = chain(12, seed=5), random_blocks(12, 32 << 10)
        async with KVClient(server.address, local="off") as kv:
            await kv.put(keys, blocks)
            assert [bytes(b) for b in await kv.get(keys)] == blocks   # six rounds of two blocks
            from kvstore.proto.v1 import kvstore_pb2 as pb

            call = kv.stub.Get(pb.GetRequest(keys=keys), timeout=10)
            header = (await anext(aiter(call))).header
            call.cancel()
        assert header.count == 2 and header.partial


async def test_a_same_host_put_is_checksummed_at_commit_when_its_bytes_may_leave_the_host():
    async with KVStoreServer(make_config(host="0.0.0.0")) as server:
        assert server.daemon.checksum_at_commit
        keys, blocks = chain(2, seed=6), random_blocks(2, 8192)
        async with KVClient(f"127.0.0.1:{server.port}") as kv:
            assert kv.path == "local"
            await kv.put(keys, blocks)
            # A same-host client scribbles on a committed block in the shared arena...
            record = server.daemon.catalog.get(_index_key(keys[0]))
            view = server.daemon.arena.view(record.primary().location, record.size)
            view[0] ^= 0xFF
        # ...and a remote reader gets a miss, not the scribbled bytes with a checksum made of them.
        async with KVClient(f"127.0.0.1:{server.port}", local="off") as kv:
            got = await kv.get(keys)
        assert got == []


def _index_key(key: bytes) -> bytes:
    from kvstore.keys import scoped

    return scoped([key], b"")[0]


def test_bad_socket_ids_are_refused_naming_the_setting():
    with pytest.raises(ConfigError, match="local_socket_uids"):
        make_config(local_socket_uids=("root",))


def test_closing_an_old_nvme_directory_never_touches_files_outside_it_through_symlinks(tmp_path):
    from kvstore.tiers.nvme import private_directory

    outside = tmp_path / "outside.txt"
    outside.write_text("not the daemon's")
    os.chmod(outside, 0o644)
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    os.chmod(other_dir, 0o755)
    directory = tmp_path / "nvme"
    directory.mkdir()
    (directory / "link").symlink_to(outside)
    (directory / "dirlink").symlink_to(other_dir)
    private_directory(str(directory))
    assert mode(outside) == 0o644 and mode(other_dir) == 0o755


def test_a_key_whose_namespace_tag_collides_is_still_another_namespace():
    """The index is keyed by an 8-byte tag of the namespace; a lookup also compares the namespace
    itself, so a (costly) tag collision between tenants reads nothing across."""
    from test_placement import DISK, MEMORY, Books, layout

    from kvstore.allocator import Extent
    from kvstore.keys import namespace_tag

    catalog = Books(layout(MEMORY, DISK)).catalog
    key = b"k" * 32
    index_key = namespace_tag(b"victim") + key
    copy = catalog.begin(index_key, 100, b"attacker", 0, Extent(0, 4096))   # as if the tags collided
    catalog.commit(copy, 7)
    assert catalog.prefix([index_key], namespace=b"victim") == []
    assert [r.key for r in catalog.prefix([index_key], namespace=b"attacker")] == [index_key]
