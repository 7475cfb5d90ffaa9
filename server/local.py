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
import collections
import contextlib
import json
import logging
import os
import secrets
import socket
import stat
import struct
import time

import grpc

from kvstore.errors import ConfigError, PermissionDeniedError
from kvstore.proto.local import METHODS, PROTOCOL_VERSION, FrameError, FramedSocket, frame
from kvstore.server.daemon import Daemon
from kvstore.server.leasing import Leasing
from kvstore.server.servicer import KVStoreServicer
from kvstore.server.window import Window, WindowedCalls
from kvstore.tenants import Tenant

log = logging.getLogger("kvstore.local")

TICKET_TTL_S = 10.0
"""How long a same-host ticket from Attach stays good (one use)."""
TICKETS_PER_TENANT = 64
MAX_TICKET_FRAME = 4096


async def _recv_exactly(loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(conn, n - len(data))
        if not chunk:
            raise ConnectionError("closed before its first frame")
        data += chunk
    return data


class LocalSocket:
    def __init__(
        self, daemon: Daemon, leasing: Leasing, servicer: KVStoreServicer, path: str,
        uids: tuple[int, ...] = (), gids: tuple[int, ...] = (), *, tenants: bool = False,
        window_bytes: int = 256 << 20, sessions_per_tenant: int = 16,
    ) -> None:
        self.daemon = daemon
        self.leasing = leasing
        self.servicer = servicer
        self.path = path
        self.admitted = Admission(uids, gids)
        self.tenants = tenants          # sessions then present a ticket and get a window
        self.window_bytes = window_bytes
        self.sessions_per_tenant = sessions_per_tenant
        self._tickets: collections.OrderedDict[str, tuple[Tenant, float]] = collections.OrderedDict()
        self._held_tickets: dict[str, collections.deque] = {}
        self._sessions_of: collections.Counter[str] = collections.Counter()
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._sessions: set[asyncio.Task] = set()

    async def start(self) -> None:
        if self.daemon.arena.fd < 0:
            raise ConfigError('this system has no memfd: the same-host path needs Linux (set local_socket = "off")')
        directory_mode, socket_mode = self.admitted.modes()
        socket_directory(os.path.dirname(self.path) or ".", directory_mode, self.admitted.owner_gid)
        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            os.chmod(self.path, socket_mode)
            if self.admitted.owner_gid is not None:
                os.chown(self.path, -1, self.admitted.owner_gid)
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

    def ticket_for(self, tenant: Tenant) -> str:
        """A one-time ticket binding the next same-host session that presents it to ``tenant``
        (handed out by the authenticated ``Attach`` call). A tenant holds at most
        ``TICKETS_PER_TENANT`` unused ones: a newer one retires its oldest."""
        now = time.monotonic()
        while self._tickets and next(iter(self._tickets.values()))[1] < now:   # oldest first: expire
            old, (owner, _) = self._tickets.popitem(last=False)
            self._held_tickets[owner.name].remove(old)
        held = self._held_tickets.setdefault(tenant.name, collections.deque())
        if len(held) >= TICKETS_PER_TENANT:
            self._tickets.pop(held.popleft(), None)
        ticket = secrets.token_urlsafe(24)
        self._tickets[ticket] = (tenant, now + TICKET_TTL_S)
        held.append(ticket)
        return ticket

    async def _tenant_of(self, conn: socket.socket) -> Tenant:
        """Read the session's first frame, its ticket; the tenant it was issued to."""
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            head = await asyncio.wait_for(_recv_exactly(loop, conn, 4), TICKET_TTL_S)
            length = int.from_bytes(head, "little")
            if not 0 < length <= MAX_TICKET_FRAME:
                raise ValueError(f"a first frame of {length} bytes")
            body = await asyncio.wait_for(_recv_exactly(loop, conn, length), TICKET_TTL_S)
            ticket = json.loads(body).get("ticket", "")
        except Exception:   # timeouts, short reads, anything that is not {"ticket": ...}
            raise PermissionDeniedError("this daemon has tenants: a same-host session starts with a ticket from Attach") from None
        issued = self._tickets.pop(ticket, None) if isinstance(ticket, str) else None
        if issued is None or issued[1] < time.monotonic():
            raise PermissionDeniedError("the same-host ticket is unknown, used or expired (attach again)")
        tenant = issued[0]
        self._held_tickets[tenant.name].remove(ticket)
        if self._sessions_of[tenant.name] >= self.sessions_per_tenant:
            raise PermissionDeniedError(
                f"tenant {tenant.name!r} already has {self.sessions_per_tenant} same-host sessions (local_sessions_per_tenant)"
            )
        return tenant

    def _refuse(self, conn: socket.socket, refusal: str) -> None:
        self.daemon.counters.local_refused += 1
        log.warning("refused a same-host client: %s", refusal)
        with contextlib.suppress(OSError):
            error = json.dumps({"version": PROTOCOL_VERSION, "error": refusal}).encode()
            conn.setblocking(True)
            conn.sendall(len(error).to_bytes(4, "little") + error)
        conn.close()

    async def _serve(self, conn: socket.socket) -> None:
        refusal = self.admitted.check(conn)
        if refusal is not None:
            return self._refuse(conn, refusal)
        tenant = window = None
        if self.tenants:
            try:
                tenant = await self._tenant_of(conn)
            except (PermissionDeniedError, OSError) as exc:
                return self._refuse(conn, str(exc))
        daemon = self.daemon
        token = self.leasing.table.open_session()
        if tenant is not None:
            self._sessions_of[tenant.name] += 1
        try:
            if tenant is not None:
                window = WindowedCalls(daemon, self.leasing, token, Window(self.window_bytes))
                shared_fd, shared_bytes, prefaulted = window.window.fd, self.window_bytes, False
            else:
                shared_fd, shared_bytes, prefaulted = daemon.arena.fd, daemon.arena.capacity_bytes, daemon.arena.prefaulted
            hello = json.dumps({
                "version": PROTOCOL_VERSION, "arena_id": daemon.arena_id, "session": token,
                "arena_bytes": shared_bytes, "prefaulted": prefaulted,
            }).encode()
            conn.setblocking(True)
            conn.sendmsg(
                [len(hello).to_bytes(4, "little") + hello],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [shared_fd]))],
            )
            framed = FramedSocket(conn)
            while True:
                body = await framed.read_frame()
                await framed.write(await self._answer(body[0], body[1:], token, tenant, window))
        except FrameError as exc:
            log.warning("closing a local session that sent %s", exc)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            log.debug("local session ended: %s", exc)
        finally:
            conn.close()
            self.leasing.close_session(token)
            if tenant is not None:
                self._sessions_of[tenant.name] -= 1
            if window is not None:
                window.close()

    async def _answer(self, method_id: int, payload: bytes, token: str, tenant: Tenant | None,
                      window: WindowedCalls | None) -> bytes:
        if method_id >= len(METHODS):
            code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            return frame(code, f"unknown local method {method_id}".encode())
        status, data = await self.servicer.call_local(METHODS[method_id][0], payload, token, tenant, window)
        return frame(status, data)


class Admission:
    """Which processes may use the socket, by their kernel-reported credentials (``SO_PEERCRED``):
    this daemon's user and root always, the listed users, members of the listed groups."""

    def __init__(self, uids: tuple[int, ...], gids: tuple[int, ...]) -> None:
        self.uids = frozenset({os.geteuid(), 0, *uids})
        self.gids = frozenset(gids)
        self.owner_gid = gids[0] if gids else None
        self._others = bool(uids)

    def modes(self) -> tuple[int, int]:
        """(directory, socket) modes: only what the admitted need to reach the socket."""
        if self._others:
            return 0o711, 0o666      # other users reach it; SO_PEERCRED decides who is served
        if self.gids:
            return 0o710, 0o660      # the group reaches it
        return 0o700, 0o600

    def check(self, conn: socket.socket) -> str | None:
        """None when the connecting process is admitted, else why not."""
        try:
            pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except OSError as exc:
            return f"its credentials cannot be read ({exc.strerror})"
        if uid in self.uids or gid in self.gids or (self.gids and self.gids & _groups(pid)):
            return None
        if self.gids and not self._others and (pid == 0 or not os.path.exists(f"/proc/{pid}")):
            # A process of another PID namespace (a worker pod): its groups cannot be read here,
            # but the socket (0660) and its directory (0710) admit only the group's members.
            return None
        return (f"process {pid} runs as uid {uid} (gid {gid}), which local_socket_uids / local_socket_gids "
                "do not admit: it uses the gRPC path")


def _groups(pid: int) -> set[int]:
    """The supplementary groups of a process (from /proc; empty where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def socket_directory(directory: str, mode: int, gid: int | None) -> None:
    """Make sure the socket's directory is this daemon's: created with ``mode`` if missing; if it
    exists, owned by this user (then set to ``mode``) and never a symlink: otherwise another user
    could put their own socket where clients look."""
    try:
        os.mkdir(directory, mode)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(directory), mode=0o755, exist_ok=True)
        os.mkdir(directory, mode)
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"local_socket: {directory} is not a directory (a symlink?): refusing to put the socket there")
    if st.st_uid != os.geteuid():
        # Whoever owns the directory can rename the socket and bind their own in its place.
        raise ConfigError(
            f"local_socket: {directory} belongs to uid {st.st_uid}, not this daemon's ({os.geteuid()}): "
            "its owner could replace the socket; give the daemon a directory of its own"
        )
    os.chmod(directory, mode)
    if gid is not None:
        os.chown(directory, -1, gid)
