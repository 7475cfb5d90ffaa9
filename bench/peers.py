"""Peer rows of ``kvstore bench``: blocks moved daemon to daemon, against raw NIXL in the same run.

Two daemons, A and B, list each other as peers (``--transfer nixl``, then ``--transfer grpc``).
The blocks of every round are fresh and chosen so that A is their rendezvous home, so B holds
none of them until it fetches them:

- **peer get**: 64 blocks of 2 MiB put on A; a same-host client of B gets them into warmed
  buffers (B fetches each from A, verifies it and hands it over through its arena): the time of
  that get.
- **peer put**: 64 fresh blocks put by a same-host client of B, until A holds all of them in its
  own memory (they travel to their home in the background): put plus travel time.
- **raw NIXL**: the same 64 x 2 MiB READ (and WRITE) between two processes' registered buffers,
  one transfer of 64 descriptors, with the same agent settings as the daemons' (UCX, the same
  progress-thread pause): what any transport over NIXL could reach here.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kvstore.bench.measure import Result, ratio, summarize

MiB = 1 << 20


def _holder(directory: str, nbytes: int) -> None:
    """Child process of the raw baseline: a registered buffer, its address and agent metadata in
    ``directory``, kept until stdin closes."""
    from kvstore.tiers.peer_nixl import make_agent, nixl_module

    api = nixl_module()
    buf = np.full(nbytes, 7, dtype=np.uint8)
    agent = make_agent(api, "bench-holder", ["UCX"])
    agent.register_memory([(buf.ctypes.data, nbytes, 0, "")], "DRAM")
    Path(directory, "holder.md").write_bytes(agent.get_agent_metadata())
    Path(directory, "holder.json").write_text(json.dumps({"address": buf.ctypes.data}))
    sys.stdin.read()


def raw_nixl(block: int, batch: int, rounds: int) -> tuple[Result, Result] | None:
    """READ and WRITE of ``batch`` blocks of ``block`` bytes with another process, ``rounds`` times."""
    from kvstore.tiers.peer_nixl import make_agent, nixl_module

    api = nixl_module()
    if api is None:
        return None
    nbytes = block * batch
    with tempfile.TemporaryDirectory() as directory:
        child = subprocess.Popen([sys.executable, "-c", f"from kvstore.bench.peers import _holder; _holder({directory!r}, {nbytes})"],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not Path(directory, "holder.json").exists():
                if child.poll() is not None or time.monotonic() > deadline:
                    return None
                time.sleep(0.05)
            remote = json.loads(Path(directory, "holder.json").read_text())["address"]
            buf = np.zeros(nbytes, dtype=np.uint8)
            agent = make_agent(api, "bench-reader", ["UCX"])
            agent.register_memory([(buf.ctypes.data, nbytes, 0, "")], "DRAM")
            name = agent.add_remote_agent(Path(directory, "holder.md").read_bytes())
            local = agent.get_xfer_descs([(buf.ctypes.data + i * block, block, 0) for i in range(batch)], "DRAM")
            far = agent.get_xfer_descs([(remote + i * block, block, 0) for i in range(batch)], "DRAM")
            rows = []
            for op in ("READ", "WRITE"):
                seconds = []
                for i in range(rounds + 1):
                    start = time.perf_counter()
                    handle = agent.initialize_xfer(op, local, far, name)
                    state = agent.transfer(handle)
                    while state == "PROC":
                        state = agent.check_xfer_state(handle)
                    agent.release_xfer_handle(handle)
                    if state != "DONE":
                        return None
                    if i:   # the first one connects
                        seconds.append(time.perf_counter() - start)
                rows.append(summarize(f"raw nixl {op.lower()}", block, batch, seconds))
            if not (buf == 7).all():
                raise SystemExit("kvstore bench: the raw NIXL read did not bring the bytes")
            return rows[0], rows[1]
        finally:
            child.stdin.close()
            child.wait(30)


def _homed_at(home: str, members: list[str], count: int) -> list[bytes]:
    """``count`` fresh keys whose rendezvous home among ``members`` is ``home``."""
    from kvstore.rendezvous import homes

    keys: list[bytes] = []
    while len(keys) < count:
        batch = [os.urandom(32) for _ in range(4 * count)]
        at = homes(batch, members)
        keys += [k for k, i in zip(batch, at.tolist()) if members[i] == home]
    return keys[:count]


async def _transfer_rows(transfer: str, block: int, batch: int, rounds: int) -> tuple[Result, Result]:
    from kvstore.client import KVClient
    from kvstore.server.process import DaemonProcess, free_ports

    ports = free_ports(2)
    members = sorted(f"127.0.0.1:{p}" for p in ports)
    common = ["--dram-bytes", str(max(2 * (rounds + 2) * block * batch, 256 * MiB)), "--dram-prefault",
              "--peers", ",".join(members), "--transfer", transfer]
    a = DaemonProcess([*common, "--port", str(ports[0])])
    b = DaemonProcess([*common, "--port", str(ports[1])])
    with a, b:
        home = a.target
        payload = [os.urandom(block)] * batch
        out = [np.ones(block, np.uint8) for _ in range(batch)]   # touched: no first-touch faults timed
        async with KVClient(a.target, local="require", timeout_s=120) as ka, \
                   KVClient(b.target, local="require", timeout_s=120) as kb:
            gets, puts = [], []
            for i in range(rounds + 1):
                keys = _homed_at(home, members, batch)
                await ka.put(keys, payload)
                start = time.perf_counter()
                got = await kb.get_into(keys, out)
                elapsed = time.perf_counter() - start
                if got != batch or bytes(out[-1]) != payload[-1]:
                    raise SystemExit(f"kvstore bench: a peer get ({transfer}) served {got} of {batch} blocks")
                if i:
                    gets.append(elapsed)
                keys = _homed_at(home, members, batch)
                start = time.perf_counter()
                await kb.put(keys, payload)
                while True:   # until the home holds them all in its own memory
                    hit = await ka.lookup(keys)
                    if hit.count == batch and all(int(t) != 5 for t in hit.tiers):
                        break
                    if time.perf_counter() - start > 60:
                        raise SystemExit(f"kvstore bench: blocks put through a peer ({transfer}) never reached their home")
                    await asyncio.sleep(0.001)
                if i:
                    puts.append(time.perf_counter() - start)
    return (summarize(f"peer get {transfer}", block, batch, gets), summarize(f"peer put {transfer}", block, batch, puts))


def peer_rows(block: int = 2 * MiB, batch: int = 64, rounds: int = 3) -> list[Result]:
    """Raw NIXL, then get and put through a peer over each transport, with ratios to raw NIXL."""
    from kvstore.tiers.peer_nixl import nixl_module

    raw = raw_nixl(block, batch, rounds)
    rows: list[Result] = []
    if raw is not None:
        rows += list(raw)
    transfers = ["nixl", "grpc"] if nixl_module() is not None else ["grpc"]
    for transfer in transfers:
        get, put = asyncio.run(_transfer_rows(transfer, block, batch, rounds))
        if raw is not None:
            get, put = get.compared(vs_raw=ratio(get, raw[0])), put.compared(vs_raw=ratio(put, raw[1]))
        rows += [get, put]
    return rows
