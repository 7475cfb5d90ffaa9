"""The local socket: how same-host clients map the daemon's arena (its landing tier, host memory)
and talk to it fast.

A client connects to a Unix socket and receives a hello frame with the arena's memfd attached
(SCM_RIGHTS), maps it, and keeps the connection open: the connection is its session, and when it
closes (the client exited or died) the daemon ends every lease the session held. The client then
sends its control calls (lookups, reserve/commit, acquire/release) over the same connection,
framed as in :mod:`kvstore.proto.local`, because a round trip here costs tens of microseconds
where a gRPC call costs about a millisecond. Block bytes never cross the socket.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import stat

import grpc

from kvstore.errors import ConfigError
from kvstore.proto.local import METHODS, PROTOCOL_VERSION, FrameError, FramedSocket, frame
from kvstore.server.daemon import Daemon
from kvstore.server.leasing import Leasing
from kvstore.server.servicer import KVStoreServicer

log = logging.getLogger("kvstore.local")


class LocalSocket:
    def __init__(self, daemon: Daemon, leasing: Leasing, servicer: KVStoreServicer, path: str) -> None:
        self.daemon = daemon
        self.leasing = leasing
        self.servicer = servicer
        self.path = path
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._sessions: set[asyncio.Task] = set()

    async def start(self) -> None:
        if self.daemon.arena.fd < 0:
            raise ConfigError('this system has no memfd: the same-host path needs Linux (set local_socket = "off")')
        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            os.chmod(self.path, 0o660)
            listener.listen(128)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise ConfigError(f"cannot create the local socket {self.path}: {exc.strerror}") from None
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept_loop(), name="kvstore-local-accept")

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _remove_stale_socket(self) -> None:
        """Remove a socket file left by a daemon that died; refuse to steal a live one."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"local_socket {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # nobody listens: stale
            return
        finally:
            probe.close()
        raise ConfigError(f"local_socket {self.path} is in use by another daemon")

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as exc:  # out of file descriptors, say: keep serving the others
                log.warning("cannot accept a same-host client: %s", exc)
                await asyncio.sleep(0.5)
                continue
            task = asyncio.create_task(self._serve(conn), name="kvstore-local-session")
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)

    async def _serve(self, conn: socket.socket) -> None:
        daemon = self.daemon
        token = self.leasing.table.open_session()
        try:
            hello = json.dumps({
                "version": PROTOCOL_VERSION, "arena_id": daemon.arena_id, "session": token,
                "arena_bytes": daemon.arena.capacity_bytes, "prefaulted": daemon.arena.prefaulted,
            }).encode()
            conn.setblocking(True)
            conn.sendmsg(
                [len(hello).to_bytes(4, "little") + hello],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [daemon.arena.fd]))],
            )
            framed = FramedSocket(conn)
            while True:
                body = await framed.read_frame()
                await framed.write(await self._answer(body[0], body[1:], token))
        except FrameError as exc:
            log.warning("closing a local session that sent %s", exc)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            log.debug("local session ended: %s", exc)
        finally:
            conn.close()
            self.leasing.close_session(token)

    async def _answer(self, method_id: int, payload: bytes, token: str) -> bytes:
        if method_id >= len(METHODS):
            code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            return frame(code, f"unknown local method {method_id}".encode())
        status, data = await self.servicer.call_local(METHODS[method_id][0], payload, token)
        return frame(status, data)
