"""Creating, binding and closing the master's listening sockets.

The master opens every listening socket before it forks and keeps it for its
whole life; workers only borrow them. Listeners are non-blocking: workers wait
for them with poll() beside their signal pipe and a lost accept race is just
EAGAIN. (O_NONBLOCK lives on the shared open file, so it is set once, here.)
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import stat
import struct
from dataclasses import dataclass, replace

from prefork.errors import BindError
from prefork.server.privileges import file_owner
from prefork.settings import Address, Config

_REASONS = {
    errno.EADDRINUSE: "address already in use",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EADDRNOTAVAIL: "address not available on this machine",
    errno.ENOENT: "directory does not exist",
}


@dataclass
class Listener:
    """A bound, listening socket and the address it really has."""

    address: Address  # as configured
    sock: socket.socket
    name: str  # the real address: port 0 resolved, e.g. 127.0.0.1:40123
    unix_inode: int = 0  # to remove only our own UNIX socket file
    proxy: bool = False  # connections start with a PROXY protocol header
    # Its name in a USR2 hand-over (upgrade.py): "b<i>" for the i-th -b
    # address, "p<position>.<i>" for a --reuse-port position's copy.
    key: str = ""

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def datagram(self) -> bool:
        return self.sock.type == socket.SOCK_DGRAM

    @property
    def tls(self) -> bool:
        """Whether its connections speak TLS (after the PROXY header, if any)."""
        return self.address.tls and not self.datagram

    @property
    def per_slot(self) -> bool:
        """Whether --reuse-port can give each worker slot its own copy: only
        for TCP and UDP addresses we bind ourselves."""
        return self.address.kind in ("tcp", "udp")

    def bound_address(self) -> Address:
        """The address as bound (port 0 resolved), to bind it again."""
        if self.address.kind == "unix":
            return self.address
        host, port = self.sock.getsockname()[:2]
        return replace(self.address, host=host, port=port)

    def drop_new_connections(self) -> None:
        """Stop new TCP connections from joining the queue, and keep the ones
        queued, so that workers can still accept them before the socket is
        closed (closing a listener resets whatever is still queued).

        A classic BPF socket filter drops every bare SYN: a client that comes
        now retries after a second and is refused once the socket is closed,
        or (with --reuse-port) lands on another worker's socket. The ACKs that
        finish handshakes already under way still pass. Other sockets are
        left alone (a UNIX listener has no SYN to drop)."""
        if self.sock.fileno() < 0 or self.sock.type != socket.SOCK_STREAM:
            return
        if self.address.kind == "fd":  # not ours: it outlives us, queue and all
            return
        if self.sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        program = ctypes.create_string_buffer(_DROP_SYN)
        fprog = struct.pack("HL", len(_DROP_SYN) // 8, ctypes.addressof(program))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
        except OSError:
            pass  # without the filter a stop is as before: queued connections reset

    def has_queue(self) -> bool:
        """Whether connections wait in this stream listener's accept queue
        (closing it now would reset them)."""
        if self.sock.fileno() < 0 or self.sock.type != socket.SOCK_STREAM:
            return False
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def close(self, unlink: bool = False) -> None:
        """Close the socket; the master also removes its UNIX socket file."""
        self.sock.close()
        if unlink and self.address.kind == "unix":
            try:
                if os.stat(self.address.path).st_ino == self.unix_inode:
                    os.unlink(self.address.path)
            except OSError:
                pass


_SO_ATTACH_FILTER = 26  # asm-generic/socket.h
_SO_DETACH_FILTER = 27
# The filter sees the TCP header: byte 13 holds the flags. "SYN and not ACK"
# is a new connection: drop it (return 0); keep everything else.
_DROP_SYN = b"".join(
    struct.pack("HBBI", code, jt, jf, k)
    for code, jt, jf, k in (
        (0x30, 0, 0, 13),  # ldb [13]          A = TCP flags
        (0x54, 0, 0, 0x12),  # and #0x12       A &= SYN|ACK
        (0x15, 0, 1, 0x02),  # jeq #SYN        bare SYN? next : skip one
        (0x06, 0, 0, 0),  # ret #0             drop
        (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1   keep the whole packet
    )
)


class AddressInUse(BindError):
    """EADDRINUSE, or a live UNIX socket file: someone listens there already."""


def _bind_error(address: Address, exc: OSError) -> BindError:
    reason = _REASONS.get(exc.errno or 0, exc.strerror or str(exc))
    error = AddressInUse if exc.errno == errno.EADDRINUSE else BindError
    return error(f"{address}: {reason}")


def _same_place(address: Address, other: Address) -> bool:
    """Whether two addresses can take each other's port or path: same kind,
    and the same port (a wildcard host overlaps every host) or path."""
    if address.kind != other.kind:
        return False
    if address.kind == "unix":
        return address.path == other.path
    return address.kind in ("tcp", "udp") and address.port == other.port != 0


def _who_has(address: Address, earlier: list[Listener], metrics: Address | None) -> str:
    """For an address in use: which other address of this same server has it."""
    for listener in earlier:
        if listener.address == address:
            return " (given twice)"
        if _same_place(address, listener.address):
            return f" (by this server's own -b {listener.address})"
    if metrics is not None and _same_place(address, metrics):
        return f" (by this server's own --metrics {metrics})"
    return ""


def _no_delay(sock: socket.socket) -> None:
    """TCP_NODELAY on a TCP listener, which every connection it accepts
    inherits (Linux): what asyncio and uvloop set on each of theirs. With
    Nagle's algorithm a reply's last short segment waits for the peer's
    delayed ACK: a 64 KiB echo (one full loopback segment and 53 bytes)
    then waits a tick per message, which cost bulk echo two thirds of its
    throughput."""
    if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _inet_socket(address: Address, backlog: int, reuse_port: bool) -> socket.socket:
    """A bound TCP listener, or a bound UDP socket for ``udp`` addresses."""
    kind = socket.SOCK_DGRAM if address.kind == "udp" else socket.SOCK_STREAM
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, socket.AF_UNSPEC, kind, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise BindError(f"{address}: cannot resolve host: {exc.strerror}") from None
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # [::]:PORT means IPv6 only, as in nginx; bind 0.0.0.0 for IPv4.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _no_delay(sock)
        sock.bind(sockaddr)
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _bind_error(address, exc) from None
    return sock


def _remove_stale_unix_socket(address: Address) -> None:
    """Remove a socket file nobody listens on; refuse to touch anything else."""
    try:
        st = os.lstat(address.path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise BindError(f"{address}: path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(address.path)
    except ConnectionRefusedError:
        os.unlink(address.path)  # stale: left by a server that died
        return
    except OSError:
        return  # let bind() report the real problem
    finally:
        probe.close()
    raise AddressInUse(f"{address}: address already in use")


def _unix_socket(address: Address, backlog: int, mode: int) -> tuple[socket.socket, int]:
    _remove_stale_unix_socket(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # never world-writable, not even for an instant
    try:
        sock.bind(address.path)
        os.chmod(address.path, mode)
        sock.listen(backlog)
        inode = os.stat(address.path).st_ino
    except OSError as exc:
        sock.close()
        raise _bind_error(address, exc) from None
    finally:
        os.umask(old_umask)
    return sock, inode


def describe(sock: socket.socket) -> str:
    """The real address of a bound socket, in the form ``-b`` accepts."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    scheme = "udp://" if sock.type == socket.SOCK_DGRAM else ""
    if sock.family == socket.AF_INET6:
        return f"{scheme}[{name[0]}]:{name[1]}"
    return f"{scheme}{name[0]}:{name[1]}"


def create_listener(
    address: Address,
    backlog: int,
    unix_mode: int = 0o660,
    reuse_port: bool = False,
    handed_over: int | None = None,
) -> Listener:
    """Bind one address. ``reuse_port`` (TCP and UDP only: Linux refuses it on
    UNIX sockets since 6.12.9) joins a SO_REUSEPORT group. ``handed_over``:
    the descriptor of this address's socket, inherited from the master this
    one upgrades (USR2): adopted, not bound, so its queue goes on."""
    if handed_over is not None:
        return adopt_listener(address, handed_over)
    if address.kind == "fd":
        return inherit_listener(address)
    inode = 0
    if address.kind == "unix":
        sock, inode = _unix_socket(address, backlog, unix_mode)
    else:
        sock = _inet_socket(address, backlog, reuse_port)
    sock.setblocking(False)
    return Listener(address, sock, describe(sock), inode, address.proxy)


def inherit_listener(address: Address) -> Listener:
    """Adopt a socket bound by someone else (``fd://N``, systemd socket
    activation): a listening TCP or UNIX stream socket, or a bound UDP one."""
    fd = address.fd
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        reason = "not a socket" if exc.errno == errno.ENOTSOCK else "not an open descriptor"
        raise BindError(f"{address}: {reason}") from None
    try:
        families = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
        if sock.family not in families:
            raise BindError(f"{address}: not an IP or UNIX socket")
        if sock.type == socket.SOCK_STREAM:
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise BindError(f"{address}: not a listening socket")
        elif sock.type != socket.SOCK_DGRAM or sock.family == socket.AF_UNIX:
            raise BindError(f"{address}: not a stream or UDP socket")
    except BindError:
        sock.detach()  # not ours to close
        raise
    os.set_inheritable(fd, False)  # a handler's subprocess must not keep it
    sock.setblocking(False)
    _no_delay(sock)
    # A filter a crashed predecessor attached (drop_new_connections) would
    # stay on a socket systemd keeps: make sure it takes connections.
    if sock.type == socket.SOCK_STREAM and sock.family != socket.AF_UNIX:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        except OSError:
            pass  # ENOENT: none attached
    proxy = address.proxy and sock.type == socket.SOCK_STREAM
    return Listener(address, sock, describe(sock), proxy=proxy)


def adopt_listener(address: Address, fd: int) -> Listener:
    """The socket of ``address`` that the previous master handed over: check
    it is what the address says, and take it as it is (bound, listening,
    its queue and its SO_REUSEPORT group kept)."""
    if address.kind == "fd":  # systemd's socket, passed on under its new number
        return inherit_listener(replace(address, fd=fd))
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        raise BindError(f"{address}: the handed-over descriptor {fd} is not a socket") from None
    want = socket.SOCK_DGRAM if address.kind == "udp" else socket.SOCK_STREAM
    if sock.type != want or (address.kind == "unix") != (sock.family == socket.AF_UNIX):
        sock.detach()
        raise BindError(f"{address}: the handed-over descriptor {fd} is another kind of socket")
    os.set_inheritable(fd, False)
    sock.setblocking(False)
    _no_delay(sock)  # a master from before it was set hands over a socket without it
    inode = 0
    if address.kind == "unix":
        try:
            inode = os.stat(address.path).st_ino
        except OSError:
            inode = 0  # gone: nothing of ours to remove on exit
    elif sock.type == socket.SOCK_STREAM:
        try:  # a SYN filter left by a master that began to stop and then did not
            sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        except OSError:
            pass  # ENOENT: none attached
    return Listener(address, sock, describe(sock), inode, address.proxy)


def create_listeners(
    addresses: tuple[Address, ...] | list[Address],
    backlog: int,
    unix_mode: int = 0o660,
    reuse_port: bool = False,
    option: str = "",
    metrics: Address | None = None,
    keys: list[str] | None = None,
    handed_over: dict[str, int] | None = None,
) -> list[Listener]:
    """Bind every address or none: on an error the ones made are closed.
    Errors start with ``option`` (e.g. "-b "); an address in use says which
    other address of ours (earlier ones, ``metrics``) holds it, if one does.
    ``keys`` names each address's listener for a hand-over; ``handed_over``
    maps such names to the descriptors a previous master passed (USR2)."""
    listeners: list[Listener] = []
    keys = keys or [""] * len(addresses)
    handed_over = handed_over or {}
    try:
        for address, key in zip(addresses, keys, strict=True):
            try:
                listener = create_listener(
                    address, backlog, unix_mode, reuse_port, handed_over.get(key)
                )
                listener.key = key
                listeners.append(listener)
            except AddressInUse as exc:
                holder = _who_has(address, listeners, metrics)
                raise AddressInUse(f"{option}{exc}{holder}") from None
            except BindError as exc:
                raise BindError(f"{option}{exc}") from None
    except BaseException:
        close_listeners(listeners, unlink=True)
        raise
    return listeners


def open_listeners(config: Config, handed_over: dict[str, int] | None = None) -> list[Listener]:
    """The master's start: bind or adopt every --bind address (all or none,
    raises BindError), or take the sockets a previous master handed over
    (``handed_over``, by key). With --proxy-protocol every stream listener
    expects a PROXY header, whatever its address says."""
    listeners = create_listeners(
        config.binds,
        config.backlog,
        config.unix_mode,
        config.reuse_port,
        option="-b ",
        metrics=config.metrics,
        keys=[f"b{i}" for i in range(len(config.binds))],
        handed_over=handed_over,
    )
    if config.proxy_protocol:
        for listener in listeners:
            listener.proxy = not listener.datagram
    return listeners


def give_unix_sockets_to(listeners: list[Listener], uid: int | None, gid: int | None) -> None:
    """Make our UNIX socket files belong to --user/--group (None: keep; no
    --group: the user's login group, which the workers run with), so that
    the service's group can connect (mode --unix-mode, 660 by default)."""
    owner = file_owner(uid, gid)
    if owner is None:
        return
    for listener in listeners:
        if listener.address.kind == "unix":
            os.chown(listener.address.path, *owner)


def close_listeners(listeners: list[Listener], unlink: bool = False) -> None:
    for listener in listeners:
        listener.close(unlink=unlink)
