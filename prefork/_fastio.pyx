# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The compiled hot loop: the fast copy of ``prefork._fastio_py``.

Rules: the hot loop imports nothing from ``prefork.server`` or
``prefork.tools``, and never its spec; what the two share (constants,
argument checks, the scoreboard slot's layout, the daytime format) comes
from ``prefork._fastio_common``, and what this module compiles in (the enums
below) is checked against it at import: ``COMPILED_FACTS``.

``_fastio_py`` is the specification (read its docstrings): the same names,
results, counters and exceptions, and the same syscalls in the same order
except where its docstring says so (datagrams are batched here with
recvmmsg/sendmmsg). Whole loops run with the GIL released, so a worker with
threads pays no GIL hand-off per message.

Bounds: checking is off, so every length handed to ``recv``/``send`` comes
from the validated buffer's own size, and pointer arithmetic only ever moves
by what the kernel reported it copied (``0 <= r <= n``).

Signals: a Python handler can only run with the GIL held, so on ``EINTR`` the
loop takes the GIL, runs ``PyErr_CheckSignals`` (which raises if a handler
raised) and otherwise retries, exactly as PEP 475 does for ``socket``. A
signal that lands while the loop is between two system calls interrupts
nothing, and the next blocking recv would sit on it until the peer acts; so
``EAGAIN`` on a *blocking* descriptor (its ``SO_RCVTIMEO``/``SO_SNDTIMEO``
expired: the sync worker sets them) is handled like ``EINTR``, which bounds
how late a handler runs by that timeout.
"""

import asyncio
import logging
import os
import socket
import stat

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from cpython.list cimport PyList_GET_ITEM, PyList_SET_ITEM
from cpython.ref cimport PyObject, Py_INCREF, Py_REFCNT, Py_XDECREF
from libc.stdint cimport int64_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memmove, memset

from prefork cimport _openssl as openssl

cdef extern from "Python.h":
    object PyBytes_FromStringAndSize(const char *data, Py_ssize_t size)

cdef extern from *:
    """
    /* A bytes object rewritten in place must not keep the hash of its old
       contents (ob_shash is deprecated API, still the field in 3.11-3.13). */
    static inline void prefork_forget_hash(PyObject *b) {
    #pragma GCC diagnostic push
    #pragma GCC diagnostic ignored "-Wdeprecated-declarations"
        ((PyBytesObject *)b)->ob_shash = -1;
    #pragma GCC diagnostic pop
    }
    """
    void prefork_forget_hash(object b)
from prefork cimport _posix as posix

from prefork import _fastio_common as common
from prefork import proxy
from prefork._fastio_common import (
    ACCESS_TIME_FORMAT, DAYTIME_FORMAT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_BUFFER, DEFAULT_MAX_CONNECTIONS,
    EMFILE_PAUSE, SERVICES, SWEEP_INTERVAL, WRITE_HIGH_WATER, WRITE_LOW_WATER,
    byte_view, check_client_args, check_loop_args, check_rate_args, client_address, client_key,
    datagram_loop_ports, fileno_of, format_client,
    peer_name, peer_of_fd, proxy_fds, read_size_for, stats_view, write_buffer_limits,
)

_log = logging.getLogger("prefork")

__all__ = [
    "ConnectionCore",
    "EventLoop",
    "StreamCounts",
    "TimerQueue",
    "Transport",
    "accept",
    "chargen",
    "counted_write",
    "discard",
    "echo",
    "rate_admit",
    "sendall",
]


cdef int _check_signals() except -1 with gil:
    PyErr_CheckSignals()
    return 0


cdef int _raise_oserror(int err) except -1 with gil:
    # OSError(errno, text) picks the subclass (ConnectionResetError, ...).
    raise OSError(err, os.strerror(err))


cdef bint _interrupted(int fd, int err) noexcept nogil:
    """Whether a failed call should run the signal handlers and retry: EINTR,
    or EAGAIN from a blocking descriptor (its send/receive timeout expired);
    EAGAIN on a non-blocking one is the caller's to see."""
    cdef int flags
    if err == posix.EINTR:
        return True
    if err != posix.EAGAIN and err != posix.EWOULDBLOCK:
        return False
    flags = posix.fcntl(fd, posix.F_GETFL)
    return flags >= 0 and not (flags & posix.O_NONBLOCK)


cdef ssize_t _recv_some(int fd, unsigned char *buf, size_t size) except -1 nogil:
    """One successful recv (0 means end of file); EINTR and an expired
    receive timeout retried after the signal handlers ran."""
    cdef ssize_t r
    cdef int err
    while True:
        r = posix.recv(fd, buf, size, 0)
        if r >= 0:
            return r
        err = posix.errno
        if not _interrupted(fd, err):
            _raise_oserror(err)
        _check_signals()


cdef ssize_t _send_some(int fd, const unsigned char *buf, size_t size) except -1 nogil:
    """One successful send; EINTR and an expired send timeout retried after
    the signal handlers ran; never raises SIGPIPE."""
    cdef ssize_t r
    cdef int err
    while True:
        r = posix.send(fd, buf, size, posix.MSG_NOSIGNAL)
        if r >= 0:
            return r
        err = posix.errno
        if not _interrupted(fd, err):
            _raise_oserror(err)
        _check_signals()


cdef int _send_all(int fd, const unsigned char *buf, size_t size) except -1 nogil:
    """Send all ``size`` bytes; calls send at least once, like socket.sendall."""
    cdef ssize_t r
    while True:
        r = _send_some(fd, buf, size)
        buf += r
        size -= <size_t>r
        if size == 0:
            return 0


def accept(listener):
    """Accept one connection on ``listener``; return its descriptor or None.

    See ``prefork._fastio_py.accept``.
    """
    cdef int fd = fileno_of(listener)
    cdef int r = -1
    cdef int err = 0
    while True:
        with nogil:
            r = posix.accept4(fd, NULL, NULL, posix.SOCK_CLOEXEC)
            if r < 0:
                err = posix.errno
        if r >= 0:
            return r
        if err == posix.EINTR:
            PyErr_CheckSignals()
            continue
        if err == posix.EAGAIN or err == posix.EWOULDBLOCK or err == posix.ECONNABORTED:
            return None
        _raise_oserror(err)


def echo(conn, buffer):
    """Echo everything read from ``conn`` back to it until end of file.

    See ``prefork._fastio_py.echo``.
    """
    cdef int fd = fileno_of(conn)
    cdef unsigned char[::1] view = byte_view(buffer, writable=True)
    cdef unsigned char *buf = &view[0]
    cdef size_t size = <size_t>view.shape[0]
    cdef unsigned long long nin = 0
    cdef unsigned long long nout = 0
    cdef ssize_t n
    with nogil:
        while True:
            n = _recv_some(fd, buf, size)
            if n == 0:
                break
            nin += <unsigned long long>n
            _send_all(fd, buf, <size_t>n)
            nout += <unsigned long long>n
    return nin, nout


def discard(conn, buffer):
    """Read and drop everything from ``conn`` until end of file (RFC 863).

    See ``prefork._fastio_py.discard``.
    """
    cdef int fd = fileno_of(conn)
    cdef unsigned char[::1] view = byte_view(buffer, writable=True)
    cdef unsigned char *buf = &view[0]
    cdef size_t size = <size_t>view.shape[0]
    cdef unsigned long long nin = 0
    cdef ssize_t n
    with nogil:
        while True:
            n = _recv_some(fd, buf, size)
            if n == 0:
                break
            nin += <unsigned long long>n
    return nin, 0


def chargen(conn, pattern):
    """Send ``pattern`` over and over until the peer goes away (RFC 864).

    See ``prefork._fastio_py.chargen``.
    """
    cdef int fd = fileno_of(conn)
    cdef const unsigned char[::1] view = byte_view(pattern, writable=False)
    cdef const unsigned char *buf = &view[0]
    cdef size_t size = <size_t>view.shape[0]
    cdef size_t offset = 0
    cdef unsigned long long nout = 0
    cdef ssize_t r
    cdef int err = 0
    with nogil:
        while True:
            r = posix.send(fd, buf + offset, size - offset, posix.MSG_NOSIGNAL)
            if r >= 0:
                nout += <unsigned long long>r
                offset = (offset + <size_t>r) % size
                continue
            err = posix.errno
            if _interrupted(fd, err):
                _check_signals()
                continue
            if err == posix.EPIPE or err == posix.ECONNRESET:
                break
            _raise_oserror(err)
    return 0, nout


def sendall(conn, data):
    """Send all of ``data`` (any bytes-like, may be empty); return its length.

    See ``prefork._fastio_py.sendall``.
    """
    cdef int fd = fileno_of(conn)
    cdef const unsigned char[::1] view = memoryview(data).cast("B")
    cdef size_t size = <size_t>view.shape[0]
    cdef const unsigned char *buf = NULL
    cdef unsigned char empty = 0
    # A zero-length send still touches the descriptor, as socket.sendall does.
    buf = &view[0] if size > 0 else &empty
    with nogil:
        _send_all(fd, buf, size)
    return size


# -- the event loop ------------------------------------------------------------------
# See prefork._fastio_py.EventLoop: the same state machine, here in C structs,
# the whole loop run without the GIL; only user protocols take it, for their
# callbacks. Epoll tags: a connection is tagged with its (aligned, so even)
# Conn pointer; a listener with (index << 1) | 1; the wake-up pipe with
# (n_listeners << 1) | 1. A connection closed during a batch is only freed
# after the batch, so a stale event never touches freed memory.

# The shared facts this module compiles in (array sizes, batch sizes, the
# slot layout), by the names prefork._fastio_common gives them; COMPILED_FACTS
# below is checked against that module at import.
cdef enum:
    MAX_EVENTS = 256
    ACCEPT_BATCH = 16
    DRAIN_MAX = 4096
    DATAGRAM_BATCH = 16
    DATAGRAM_SIZE = 65536
    CHARGEN_DATAGRAM_MAX = 512
    SLOT_SIZE = 136
    HEARTBEAT_OFFSET = 0  # a double
    COUNTERS_OFFSET = 16  # N_COUNTERS int64s, in the order of LOOP_COUNTERS
    N_COUNTERS = 15
    LOW_PORT_LIMIT = 1024
    RATE_WAYS = 4
    CLIENT_WAYS = 4
    CLIENT_HEADER_SIZE = 64
    ACCESS_LOG_BUFFER = 65536
    ACCESS_PIPE_WRITE = 4096
    CLIENT_MAX = 64  # "[" IPv6 "]:" port, and a NUL
    CORK_CHUNKS = 16
    CORK_BYTES = 65536

# How a connection ended, for the access log: in the order of
# prefork._fastio_common.END_REASONS (_end_name gives each its name).
cdef enum End:
    END_EOF, END_RESET, END_IDLE, END_MAX_BUFFER, END_PROXY, END_LIMIT, END_HANDLER,
    END_SHUTDOWN, END_CLOSED, END_TLS, N_ENDS


cdef const char *_end_name(int end) noexcept nogil:
    if end == END_EOF:
        return "eof"
    if end == END_RESET:
        return "reset"
    if end == END_IDLE:
        return "idle-timeout"
    if end == END_MAX_BUFFER:
        return "max-buffer"
    if end == END_PROXY:
        return "proxy-rejected"
    if end == END_LIMIT:
        return "limit-refused"
    if end == END_HANDLER:
        return "handler-error"
    if end == END_SHUTDOWN:
        return "shutdown"
    if end == END_TLS:
        return "tls-failed"
    return "closed"

# Why the UDP guard refused a datagram: in the order of
# prefork._fastio_common.UDP_REFUSALS (ANSWER: it did not).
cdef enum Refusal:
    REFUSED_LOOP, REFUSED_SOURCE, REFUSED_RATE, N_REFUSALS, ANSWER

# Why the per-client limits refused a connection: in the order of
# prefork._fastio_common.LIMIT_REFUSALS (ADMITTED: they did not).
cdef enum LimitRefusal:
    LIMIT_CONNS, LIMIT_RATE, N_LIMITS, ADMITTED

# In the order of prefork._fastio_common.SERVICES.
cdef enum Service:
    ECHO, DISCARD, CHARGEN, DAYTIME, PROTOCOL

COMPILED_FACTS = {
    "SERVICES": common.enum_order({
        "echo": ECHO, "discard": DISCARD, "chargen": CHARGEN, "daytime": DAYTIME,
        "protocol": PROTOCOL,
    }),
    "MAX_EVENTS": MAX_EVENTS,
    "ACCEPT_BATCH": ACCEPT_BATCH,
    "CORK_CHUNKS": CORK_CHUNKS,
    "CORK_BYTES": CORK_BYTES,
    "DRAIN_MAX": DRAIN_MAX,
    "DATAGRAM_BATCH": DATAGRAM_BATCH,
    "DATAGRAM_SIZE": DATAGRAM_SIZE,
    "CHARGEN_DATAGRAM_MAX": CHARGEN_DATAGRAM_MAX,
    "SLOT_SIZE": SLOT_SIZE,
    "HEARTBEAT_OFFSET": HEARTBEAT_OFFSET,
    "COUNTERS_OFFSET": COUNTERS_OFFSET,
    "LOOP_COUNTERS": (  # as _publish writes them
        "accepted", "active", "bytes_in", "bytes_out",
        "idle_closed", "max_buffer_closed", "handler_errors", "proxy_rejected",
        "udp_refused_loop", "udp_refused_source", "udp_refused_rate", "udp_rate_evictions",
        "limit_refused_conns", "limit_refused_rate", "limit_evictions",
    ),
    "LIMIT_REFUSALS": common.enum_order({"conns": LIMIT_CONNS, "rate": LIMIT_RATE}),
    "CLIENT_WAYS": CLIENT_WAYS,
    "CLIENT_HEADER_SIZE": CLIENT_HEADER_SIZE,
    "UDP_REFUSALS": common.enum_order({
        "loop": REFUSED_LOOP, "source": REFUSED_SOURCE, "rate": REFUSED_RATE,
    }),
    "LOW_PORT_LIMIT": LOW_PORT_LIMIT,
    "RATE_WAYS": RATE_WAYS,
}
COMPILED_FACTS["END_REASONS"] = tuple(
    (<bytes>_end_name(end)).decode("ascii") for end in range(N_ENDS))
COMPILED_FACTS["ACCESS_LOG_BUFFER"] = ACCESS_LOG_BUFFER
COMPILED_FACTS["ACCESS_PIPE_WRITE"] = ACCESS_PIPE_WRITE
common.check_facts(__name__, COMPILED_FACTS, vars(common))

cdef double C_EMFILE_PAUSE = EMFILE_PAUSE
cdef size_t C_INT_MAX = 2147483647  # OpenSSL's lengths are ints
cdef int TLS_HANDSHAKES_PER_TURN = common.TLS_HANDSHAKES_PER_TURN


# What closed a connection, for connection_lost(exc) and the access log.
cdef enum:
    CLOSED_OK = 0  # end of file, close(): exc is None
    CLOSED_OVERFLOW = -1  # owed more than max_buffer: BufferError
    CLOSED_IDLE = -2  # the idle timeout: exc is None
    CLOSED_SHUTDOWN = -3  # the loop's close(): exc is None
    CLOSED_TLS = -4  # no TLS handshake in time, or a fatal TLS error


cdef struct RateEntry:
    # prefork._fastio_common.RATE_ENTRY: a prefix's bucket in the shared table.
    uint64_t family  # 4 or 6; 0: empty
    uint64_t prefix  # the first 32 or 64 bits of the address, masked
    int64_t tat  # its theoretical arrival time, CLOCK_MONOTONIC ns

cdef uint64_t RATE_HASH = 0x9E3779B97F4A7C15
COMPILED_FACTS["RATE_HASH"] = RATE_HASH
COMPILED_FACTS["RATE_ENTRY_SIZE"] = sizeof(RateEntry)


cdef inline uint64_t _be(const unsigned char *p, int n) noexcept nogil:
    """``n`` bytes at ``p`` as an unsigned big-endian number."""
    cdef uint64_t value = 0
    cdef int i
    for i in range(n):
        value = (value << 8) | p[i]
    return value


cdef struct RateLimit:
    # A GCRA rate limit over a table of RateEntry (the spec's rate_admit).
    RateEntry *table  # NULL: no limit
    uint64_t sets  # a power of two, of RATE_WAYS entries each
    int64_t interval, tolerance  # 1/rate and (burst - 1)/rate, ns


cdef int _set_rate(RateLimit *limit, const unsigned char[::1] view, int64_t interval,
                   int64_t tolerance) except -1:
    """Point ``limit`` at the table ``view`` (check_rate_args validated it)."""
    limit.table = <RateEntry *>&view[0]
    limit.sets = <uint64_t>(view.shape[0] // (sizeof(RateEntry) * RATE_WAYS))
    limit.interval = interval
    limit.tolerance = tolerance
    return 0


# Workers admit at once on one table: the TAT moves by compare-and-swap,
# and a new entry is claimed by swapping its family to RATE_CLAIMING, so no
# update is lost (the spec locks the set instead; see _fastio_common).
cdef extern from *:
    """
    static inline int pf_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                           __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    static inline int pf_cas_i64(int64_t *p, int64_t expected, int64_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                           __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    static inline uint64_t pf_load_u64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline int64_t pf_load_i64(int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void pf_store_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void pf_store_i64(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    bint pf_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired) noexcept nogil
    bint pf_cas_i64(int64_t *p, int64_t expected, int64_t desired) noexcept nogil
    uint64_t pf_load_u64(uint64_t *p) noexcept nogil
    int64_t pf_load_i64(int64_t *p) noexcept nogil
    void pf_store_u64(uint64_t *p, uint64_t v) noexcept nogil
    void pf_store_i64(int64_t *p, int64_t v) noexcept nogil

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef uint64_t RATE_CLAIMING = 0xFFFFFFFFFFFFFFFF
COMPILED_FACTS["RATE_CLAIMING"] = RATE_CLAIMING
# How often a set with an entry being claimed is scanned again before the
# claim counts as abandoned (its worker died between two stores: the entry
# is taken over, never waited on forever).
cdef int RATE_CLAIM_SPINS = 10000


cdef inline int64_t _monotonic_ns() noexcept nogil:
    cdef posix.timespec ts
    posix.clock_gettime(posix.CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef bint _rate_take(RateLimit *limit, uint64_t family, uint64_t prefix, int64_t now,
                     bint *evicted) noexcept nogil:
    """Whether ``prefix`` may have one more at ``now`` (the spec's
    rate_admit); ``evicted`` says whether making room pushed out a bucket
    still limited."""
    cdef int64_t tat, held, victim_tat = 0
    cdef uint64_t mixed, seen, victim_family = 0
    cdef RateEntry *entry
    cdef RateEntry *found = NULL
    cdef RateEntry *victim
    cdef int way, spins = 0
    cdef bint claimed
    mixed = ((family * RATE_HASH) ^ prefix) * RATE_HASH
    entry = limit.table + ((mixed >> 32) & (limit.sets - 1)) * RATE_WAYS
    evicted[0] = False
    while found == NULL:
        victim = NULL
        claimed = False
        for way in range(RATE_WAYS):
            seen = pf_load_u64(&entry[way].family)
            if seen == RATE_CLAIMING and spins < RATE_CLAIM_SPINS:
                claimed = True  # being written: perhaps our prefix
                continue
            if seen == family and entry[way].prefix == prefix:
                found = &entry[way]
                break
            held = pf_load_i64(&entry[way].tat) if seen != 0 else 0  # empty: older than any
            if victim == NULL or held < victim_tat:
                victim, victim_tat, victim_family = &entry[way], held, seen
        if found != NULL:
            break
        if claimed or victim == NULL:
            spins += 1
            sched_yield()
            continue
        if pf_cas_u64(&victim.family, victim_family, RATE_CLAIMING):
            evicted[0] = victim_family != 0 and victim_family != RATE_CLAIMING and victim_tat > now
            victim.prefix = prefix
            pf_store_i64(&victim.tat, now)
            pf_store_u64(&victim.family, family)  # released whole
            found = victim
    while True:
        tat = pf_load_i64(&found.tat)
        if tat > now + limit.tolerance:
            return False
        if pf_cas_i64(&found.tat, tat, (tat if tat > now else now) + limit.interval):
            return True


def rate_admit(unsigned char[::1] table, key, int64_t now, int64_t interval,
               int64_t tolerance, int lock_fd=-1):
    """The spec's rate_admit over the compiled rule (``lock_fd`` is not
    needed: the compare-and-swap makes each update whole). Called per
    datagram: the table (writable, as the typed view insists) is only
    checked to hold 2**k sets, not validated again as check_rate_args does."""
    cdef RateLimit limit
    cdef bint evicted
    cdef uint64_t family = key[0], prefix = key[1]
    cdef uint64_t sets = <uint64_t>table.shape[0] // (sizeof(RateEntry) * RATE_WAYS)
    if sets == 0 or sets & (sets - 1):
        raise ValueError("the rate table must hold 2**k sets of RATE_WAYS entries")
    _set_rate(&limit, table, interval, tolerance)
    admitted = _rate_take(&limit, family, prefix, now, &evicted)
    return admitted, evicted


cdef struct ClientEntry:
    # prefork._fastio_common.CLIENT_ENTRY: a client's open connections in
    # one worker's table.
    uint64_t high, low  # the address as IPv6 (IPv4-mapped), big-endian words
    int64_t count  # 0: free

COMPILED_FACTS["CLIENT_ENTRY_SIZE"] = sizeof(ClientEntry)


cdef inline ClientEntry *_client_set(unsigned char *tables, int slot, int64_t entries,
                                     uint64_t high, uint64_t low) noexcept nogil:
    """The first entry of the set ``(high, low)`` lives in, in table ``slot``
    (the spec's client_set)."""
    cdef uint64_t mixed = ((high * RATE_HASH) ^ low) * RATE_HASH
    cdef uint64_t sets = <uint64_t>(entries // CLIENT_WAYS)
    return ((<ClientEntry *>(tables + CLIENT_HEADER_SIZE)) + slot * entries
            + ((mixed >> 32) & (sets - 1)) * CLIENT_WAYS)


cdef inline ClientEntry *_client_find(ClientEntry *entry, uint64_t high,
                                      uint64_t low) noexcept nogil:
    """The entry of the set at ``entry`` that counts ``(high, low)``, or NULL."""
    cdef int way
    for way in range(CLIENT_WAYS):
        if entry[way].count > 0 and entry[way].high == high and entry[way].low == low:
            return &entry[way]
    return NULL


cdef inline bint _sockaddr_key(const posix.sockaddr_storage *addr, uint64_t *high,
                               uint64_t *low) noexcept nogil:
    """The spec's client_key of an accepted peer; False if not IPv4 or IPv6."""
    cdef const unsigned char *a
    if addr.ss_family == posix.AF_INET:
        a = <const unsigned char *>&(<const posix.sockaddr_in *>addr).sin_addr
        high[0] = 0
        low[0] = (<uint64_t>0xFFFF << 32) | _be(a, 4)
        return True
    if addr.ss_family == posix.AF_INET6:
        a = <const unsigned char *>&(<const posix.sockaddr_in6 *>addr).sin6_addr
        high[0] = _be(a, 8)
        low[0] = _be(a + 8, 8)
        return True
    return False


cdef struct Access:
    # What the access log says of a connection (allocated only with a log).
    double started
    unsigned long long nin, nout
    char client[CLIENT_MAX]


cdef struct Datagrams:
    # Buffers for one recvmmsg/sendmmsg batch, allocated once per loop.
    posix.mmsghdr received[DATAGRAM_BATCH]
    posix.mmsghdr replies[DATAGRAM_BATCH]
    posix.iovec in_iov[DATAGRAM_BATCH]
    posix.iovec out_iov[DATAGRAM_BATCH]
    posix.sockaddr_storage senders[DATAGRAM_BATCH]
    unsigned char data[DATAGRAM_BATCH][DATAGRAM_SIZE]


cdef struct Conn:
    int fd
    unsigned int events  # what the epoll set waits for
    bint registered
    bint eof  # close once everything owed is flushed
    bint reading  # false after end of file
    bint closed
    unsigned char *pending  # owed bytes are pending[sent:pending_len]
    size_t pending_len
    size_t pending_cap
    size_t sent
    size_t offset  # chargen position in the pattern
    double last_active
    PyObject *protocol  # owned reference, or NULL
    PyObject *transport  # owned reference, or NULL
    PyObject *header  # owned bytearray while a PROXY header is read, else NULL
    PyObject *peer  # owned: the client's address from a PROXY header, or NULL
    bint peer_eof  # the peer's end of file came (how it ended, for the log)
    bint read_paused  # Transport.pause_reading()
    bint write_paused  # the protocol was told pause_writing()
    bint shut_when_flushed  # Transport.write_eof() while owing
    bint buffered  # an asyncio.BufferedProtocol: get_buffer/buffer_updated
    bint read_wide  # its last read filled its buffer: read on into the loop's
    bint held  # counted for --max-conns-per-ip under (key_high, key_low): release it
    uint64_t key_high, key_low
    size_t low_water  # owed bytes at which a paused protocol resumes writing
    Access *access  # NULL without an access log
    # TLS (a tls_listeners connection): OpenSSL on the socket itself.
    bint secure  # it speaks TLS once its PROXY header, if any, is read
    openssl.SSL *ssl  # made when the handshake starts, freed at the close
    bint tls_ready  # the handshake is done: the service runs
    bint tls_want_out  # OpenSSL waits to write before it can go on (EPOLLOUT)
    double tls_deadline  # the handshake must be done by then
    Conn *prev
    Conn *next


cdef inline double _monotonic() noexcept nogil:
    cdef posix.timespec ts
    posix.clock_gettime(posix.CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline size_t _owed(Conn *conn) noexcept nogil:
    return conn.pending_len - conn.sent


cdef class Transport:
    """What a protocol gets in ``connection_made``; see the spec's Transport."""

    cdef EventLoop _loop  # None once the connection is closed
    cdef Conn *_conn
    cdef dict _extra
    cdef size_t _high
    cdef bint _eof_written
    cdef object _sock  # get_extra_info("socket"), made on demand, detached at the close

    def write(self, data):
        cdef Py_buffer view
        cdef EventLoop loop
        if self._eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._loop is None or self._conn.eof:
            return
        loop = self._loop
        if loop.holding and loop.cork_conn != self._conn:
            # A callback of the asyncio loop writes (hold_writes): another
            # connection's held bytes leave first, then this one's are held.
            loop._uncork(False)
            if self._loop is None or self._conn.eof:
                return
            loop.cork_conn = self._conn
        if loop.cork_conn == self._conn:
            # Its protocol handles a read: bytes are kept (a reference) and
            # sent with the others when it returns. Anything else, or past
            # the bounds, first sends what came before, then goes as usual.
            if (type(data) is bytes and loop.n_corked < CORK_CHUNKS
                    and <size_t>PyBytes_GET_SIZE(data) <= CORK_BYTES - loop.corked_len
                    and _owed(self._conn) == 0):
                if PyBytes_GET_SIZE(data) == 0:
                    return
                Py_INCREF(data)
                loop.corked[loop.n_corked] = <PyObject *>data
                loop.n_corked += 1
                loop.corked_len += <size_t>PyBytes_GET_SIZE(data)
                self._conn.last_active = loop.batch_now
                return
            loop._uncork(False)
            if self._loop is None or self._conn.eof:
                return
        # bytes, the usual case, need no buffer taken; any other bytes-like
        # object is read as its bytes (a non-contiguous one is a BufferError).
        if type(data) is bytes:
            if PyBytes_GET_SIZE(data) == 0:
                return
            self._loop._write(self._conn, <const unsigned char *>PyBytes_AS_STRING(data),
                              <size_t>PyBytes_GET_SIZE(data))
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                if view.len == 0:
                    return
                self._loop._write(self._conn, <const unsigned char *>view.buf, <size_t>view.len)
            finally:
                PyBuffer_Release(&view)
        if (self._loop is not None and not self._conn.write_paused
                and _owed(self._conn) > self._high):
            self._pause_writing()

    cdef _pause_writing(self):
        self._conn.write_paused = True
        self._loop._flow_control(self._conn, "pause_writing")

    def writelines(self, list_of_data):
        self.write(b"".join(list_of_data))

    cdef int _uncork(self) except -1:
        """Send what this connection's protocol wrote during the read it
        handles now, before what follows (see EventLoop._uncork)."""
        if self._loop is not None and self._loop.cork_conn == self._conn:
            self._loop._uncork(False)
        return 0

    def write_eof(self):
        self._uncork()
        if self._loop is None or self._conn.eof or self._eof_written:
            return
        self._eof_written = True
        if _owed(self._conn) > 0:
            self._conn.shut_when_flushed = True
        elif posix.shutdown(self._conn.fd, posix.SHUT_WR) < 0:
            _raise_oserror(posix.errno)

    def can_write_eof(self):
        return True

    def close(self):
        self._uncork()
        if self._loop is not None:
            self._loop._close_when_flushed(self._conn)

    def abort(self):
        if self._loop is not None:
            self._loop._close(self._conn, CLOSED_OK)

    def _force_close(self, exc):
        """What asyncio's TLS protocol calls on a failed handshake or a
        fatal TLS error (see the spec)."""
        if self._loop is not None:
            self._loop._close_exc(self._conn, exc, END_TLS)

    def is_closing(self):
        return self._loop is None or self._conn.eof

    def pause_reading(self):
        self._set_reading(False)

    def resume_reading(self):
        self._set_reading(True)

    cdef _set_reading(self, bint reading):
        if self._loop is not None and self._conn.read_paused == reading:
            self._conn.read_paused = not reading
            if self._conn.registered:
                self._loop._update(self._conn)

    def is_reading(self):
        return self._loop is not None and not self._conn.eof and not self._conn.read_paused

    def set_write_buffer_limits(self, high=None, low=None):
        high, low = write_buffer_limits(high, low)
        self._uncork()
        self._high = high
        if self._loop is not None:
            self._conn.low_water = low
            if not self._conn.write_paused and _owed(self._conn) > self._high:
                self._pause_writing()

    def get_write_buffer_limits(self):
        low = self._conn.low_water if self._loop is not None else WRITE_LOW_WATER
        return low, self._high

    def get_write_buffer_size(self):
        self._uncork()
        return _owed(self._conn) if self._loop is not None else 0

    def get_protocol(self):
        if self._loop is None or self._conn.protocol == NULL:
            return None
        return <object>self._conn.protocol

    def set_protocol(self, protocol):
        if self._loop is None:
            return
        Py_XDECREF(self._conn.protocol)
        self._conn.protocol = <PyObject *>protocol
        Py_INCREF(protocol)
        self._conn.buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def get_extra_info(self, name, default=None):
        if name == "socket":
            if self._sock is None and self._loop is not None:
                self._sock = socket.socket(fileno=self._conn.fd)
            return self._sock if self._sock is not None else default
        return self._extra.get(name, default)


cdef class EventLoop:
    """A worker's epoll loop serving one service on many connections.

    See ``prefork._fastio_py.EventLoop``.
    """

    cdef int epfd
    cdef int wakeup_fd
    cdef int *listeners
    cdef int n_listeners
    cdef unsigned char *proxied  # per listener: its connections start with a PROXY header
    cdef unsigned char *secured  # per listener: its connections speak TLS
    cdef openssl.SSL_CTX *tls_ctx  # the master's context's (kept alive by tls_context)
    cdef object tls_context
    cdef double tls_timeout
    cdef int handshakes  # handshake steps taken in this turn
    cdef object proxy_trusted
    cdef Service svc
    cdef readonly str service
    cdef readonly int max_connections
    cdef readonly unsigned long long max_accepts
    cdef readonly size_t max_buffer
    cdef readonly double idle_timeout
    cdef readonly unsigned long long accepted, bytes_in, bytes_out, idle_closed, resource_errors
    cdef readonly unsigned long long datagrams
    cdef readonly unsigned long long max_buffer_closed, handler_errors, proxy_rejected
    cdef readonly unsigned long long access_log_dropped
    cdef readonly unsigned long long udp_refused_loop, udp_refused_source
    cdef readonly unsigned long long udp_refused_rate, udp_rate_evictions
    cdef object rate_view  # keeps the rate table alive
    cdef RateLimit udp_rate  # table NULL: no UDP rate limit
    cdef uint64_t rate_mask4, rate_mask6
    cdef unsigned short *loop_ports  # the UDP guard's ports (host order)
    cdef int n_loop_ports
    cdef bint allow_low_ports
    cdef posix.sockaddr_storage refused_from[N_REFUSALS]  # the last sender refused, by reason
    # The per-client limits (see the spec's ClientLimits).
    cdef readonly unsigned long long limit_refused_conns, limit_refused_rate, limit_evictions
    cdef object client_view, conn_rate_view  # keep the tables alive
    cdef unsigned char *clients  # the client region; NULL: no --max-conns-per-ip
    cdef int64_t conn_limit, client_entries
    cdef int conn_slot
    cdef RateLimit conn_rate  # table NULL: no --conn-rate-per-ip
    cdef bint limits_on
    cdef uint64_t limit_from[N_LIMITS][2]  # the last client refused, by reason
    cdef bint limit_from_set[N_LIMITS]
    cdef int alog_fd  # the access log, -1 without
    cdef bint alog_socket  # written with send(MSG_DONTWAIT)
    cdef bint alog_pipe  # written ACCESS_PIPE_WRITE bytes of whole lines at most
    cdef unsigned char *alog  # ACCESS_LOG_BUFFER bytes of lines not yet written
    cdef size_t alog_len
    cdef int pid
    cdef int *dgram_fds
    cdef int n_dgrams
    cdef Datagrams *dgram
    cdef uint64_t rng  # xorshift state for chargen's random reply sizes
    cdef object stats_view  # keeps the stats memory alive
    cdef unsigned char *stats  # a scoreboard slot, written at every wake-up without the GIL
    cdef int n_active
    cdef bint _accepting, _recycled, armed, draining
    cdef bint _return_soon  # return_soon(): leave run() before waiting again
    cdef bint in_batch  # serving what epoll_wait returned, at batch_now
    cdef double batch_now
    cdef uint64_t watch_tag  # watch()'s descriptor's epoll tag; 0: none
    cdef unsigned long long drained
    cdef double paused_until, next_sweep, sweep_interval
    cdef unsigned char *buf
    cdef size_t read_size
    cdef object factory
    cdef bytes _spare  # the last bytes object data_received got (see there)
    # The connection whose protocol handles a read now, and the bytes objects
    # it wrote meanwhile (owned references), sent together when it returns.
    cdef Conn *cork_conn
    cdef bint holding  # hold_writes: the asyncio loop's callbacks run (see there)
    cdef int n_corked
    cdef size_t corked_len
    cdef PyObject *corked[CORK_CHUNKS]
    cdef object pattern_view  # keeps chargen's pattern alive
    cdef const unsigned char *pattern
    cdef size_t pattern_len
    cdef Conn *head  # live connections
    cdef Conn *graveyard  # closed during this batch, freed after it
    cdef bytes daytime_format  # owns the bytes daytime_fmt points into
    cdef const char *daytime_fmt
    cdef posix.epoll_event events[MAX_EVENTS]

    def __cinit__(self):
        self.epfd = -1
        self.wakeup_fd = -1
        self.alog_fd = -1

    def __init__(self, listeners, str service, *, int wakeup_fd=-1,
                 int max_connections=DEFAULT_MAX_CONNECTIONS, max_buffer=DEFAULT_MAX_BUFFER,
                 idle_timeout=DEFAULT_IDLE_TIMEOUT, pattern=b"", protocol_factory=None,
                 datagram_sockets=(), max_accepts=0, stats=None, proxy_listeners=(),
                 proxy_trusted=None, access_log=-1, udp_allow_low_ports=False,
                 udp_loop_ports=(), udp_rate=0.0, udp_burst=1,
                 udp_rate_prefix=common.DEFAULT_RATE_PREFIX, udp_rate_table=None,
                 conn_limit=0, conn_tables=None, conn_slot=0, conn_rate=0.0, conn_burst=1,
                 conn_rate_table=None, tls_context=None, tls_listeners=(),
                 tls_handshake_timeout=common.DEFAULT_TLS_HANDSHAKE_TIMEOUT):
        cdef const unsigned char[::1] view
        cdef unsigned char[::1] stats_bytes
        cdef unsigned char[::1] table_bytes
        cdef int index
        pattern_view = check_loop_args(service, max_connections, max_buffer, idle_timeout,
                                        pattern, protocol_factory)
        if datagram_sockets and service == "protocol":
            raise ValueError("datagram sockets serve the built-in services only")
        rate_view, interval, tolerance, prefix4, prefix6 = check_rate_args(
            udp_rate, udp_burst, udp_rate_prefix, udp_rate_table)
        client_view, conn_rate_view, conn_interval, conn_tolerance = check_client_args(
            conn_limit, conn_tables, conn_slot, conn_rate, conn_burst, conn_rate_table)
        fds = [fileno_of(listener) for listener in listeners]
        dgram_fds = [fileno_of(sock) for sock in datagram_sockets]
        if rate_view is not None:
            self.rate_view = rate_view
            _set_rate(&self.udp_rate, rate_view, interval, tolerance)
            self.rate_mask4 = ((1 << prefix4) - 1) << (32 - prefix4)
            self.rate_mask6 = ((1 << prefix6) - 1) << (64 - prefix6)
        if client_view is not None:
            table_bytes = client_view
            self.client_view = client_view
            self.clients = &table_bytes[0]
            self.conn_limit = conn_limit
            self.conn_slot = conn_slot
            self.client_entries = common.CLIENT_HEADER.unpack_from(client_view, 0)[1]
        if conn_rate_view is not None:
            self.conn_rate_view = conn_rate_view
            _set_rate(&self.conn_rate, conn_rate_view, conn_interval, conn_tolerance)
        self.limits_on = self.clients != NULL or self.conn_rate.table != NULL
        index = SERVICES.index(service)
        self.svc = <Service>index
        self.service = service
        self.factory = protocol_factory
        self.max_connections = max_connections
        self.max_accepts = max_accepts
        self.stats_view = stats_view(stats)
        if self.stats_view is not None:
            stats_bytes = self.stats_view
            self.stats = &stats_bytes[0]
        self.max_buffer = max_buffer
        self.idle_timeout = idle_timeout
        if not (isinstance(access_log, int) and access_log < 0):
            self.alog_fd = fileno_of(access_log)
            mode = os.fstat(self.alog_fd).st_mode
            self.alog_socket = stat.S_ISSOCK(mode)
            self.alog_pipe = stat.S_ISFIFO(mode)
            self.alog = <unsigned char *>malloc(ACCESS_LOG_BUFFER)
            if self.alog == NULL:
                raise MemoryError()
        self.pid = os.getpid()
        self.read_size = read_size_for(max_buffer)
        self.buf = <unsigned char *>malloc(self.read_size)
        self.listeners = <int *>malloc(sizeof(int) * (len(fds) + 1))
        self.proxied = <unsigned char *>calloc(len(fds) + 1, 1)
        self.secured = <unsigned char *>calloc(len(fds) + 1, 1)
        if (self.buf == NULL or self.listeners == NULL or self.proxied == NULL
                or self.secured == NULL):
            raise MemoryError()
        secured_fds = common.check_tls_args(service, tls_context, tls_listeners, fds,
                                            tls_handshake_timeout)
        if secured_fds:
            self.tls_ctx = openssl.context_ctx(tls_context)
            self.tls_context = tls_context
            self.tls_timeout = tls_handshake_timeout
        proxied_fds = proxy_fds(proxy_listeners, fds)
        self.proxy_trusted = proxy_trusted
        self.n_listeners = len(fds)
        for i, fd in enumerate(fds):
            self.listeners[i] = fd
            self.proxied[i] = fd in proxied_fds
            self.secured[i] = fd in secured_fds
        self.n_dgrams = len(dgram_fds)
        if self.n_dgrams:
            self.dgram_fds = <int *>malloc(sizeof(int) * self.n_dgrams)
            self.dgram = <Datagrams *>malloc(sizeof(Datagrams))
            if self.dgram_fds == NULL or self.dgram == NULL:
                raise MemoryError()
            for i, fd in enumerate(dgram_fds):
                self.dgram_fds[i] = fd
        self.rng = 0x9E3779B97F4A7C15 ^ <uint64_t>id(self)
        if pattern_view is not None:
            view = pattern_view
            self.pattern_view = pattern_view
            self.pattern = &view[0]
            self.pattern_len = <size_t>view.shape[0]
        self.daytime_format = DAYTIME_FORMAT.encode("ascii")
        self.daytime_fmt = self.daytime_format
        self._accepting = True
        self.epfd = posix.epoll_create1(posix.EPOLL_CLOEXEC)
        if self.epfd < 0:
            _raise_oserror(posix.errno)
        self.wakeup_fd = wakeup_fd
        if wakeup_fd >= 0:
            self._ctl(posix.EPOLL_CTL_ADD, wakeup_fd, posix.EPOLLIN,
                      self._listener_tag(self.n_listeners))
        loop_ports = sorted(datagram_loop_ports(dgram_fds, udp_loop_ports))
        self.loop_ports = <unsigned short *>malloc(sizeof(unsigned short) * (len(loop_ports) + 1))
        if self.loop_ports == NULL:
            raise MemoryError()
        for i, port in enumerate(loop_ports):
            self.loop_ports[i] = port
        self.n_loop_ports = len(loop_ports)
        self.allow_low_ports = bool(udp_allow_low_ports)
        for i in range(self.n_dgrams):
            self._ctl(posix.EPOLL_CTL_ADD, self.dgram_fds[i], posix.EPOLLIN | posix.EPOLLEXCLUSIVE,
                      self._dgram_tag(i))
        self.sweep_interval = min(SWEEP_INTERVAL, self.idle_timeout / 2 or SWEEP_INTERVAL)
        if self.tls_ctx != NULL:  # the sweep closes late handshakes too
            self.sweep_interval = min(self.sweep_interval, self.tls_timeout / 2)
        self.next_sweep = _monotonic() + self.sweep_interval

    def __dealloc__(self):
        self._release()

    @property
    def active(self):
        return self.n_active

    @property
    def accepting(self):
        return self._accepting

    @property
    def recycled(self):
        return self._recycled

    @property
    def udp_refused_from(self):
        """The last sender the UDP guard refused, by reason (see the spec)."""
        cdef char text[CLIENT_MAX]
        cdef int reason
        found = {}
        for reason in range(<int>N_REFUSALS):
            if self.refused_from[reason].ss_family == 0:
                found[common.UDP_REFUSALS[reason]] = ""
            else:
                _format_client(&self.refused_from[reason], text)
                found[common.UDP_REFUSALS[reason]] = (<bytes>text).decode("ascii")
        return found

    @property
    def limit_refused_from(self):
        """The last client the per-client limits refused, by reason (see the spec)."""
        cdef int reason
        return {
            common.LIMIT_REFUSALS[reason]: client_address(
                (self.limit_from[reason][0], self.limit_from[reason][1])
            ) if self.limit_from_set[reason] else ""
            for reason in range(<int>N_LIMITS)
        }

    def drain(self):
        """Accept what is queued, then stop accepting (see the spec)."""
        if self._recycled:  # accept again, but only to take the queue
            self._recycled = False
            self._accepting = True
        if self._accepting and not self.draining:
            self.draining = True
            self.drained = 0

    def return_soon(self):
        """Make ``run`` return before it waits again (see the spec)."""
        self._return_soon = True

    def hold_writes(self, bint on):
        """Hold what callbacks write between two ``run`` calls, one
        connection at a time, as during a read; off sends it (see the spec)."""
        if not on:
            self._uncork(False)
            self.cork_conn = NULL
        self.holding = on

    def stop_accepting(self):
        """Take the listeners out of the loop for good (graceful stop)."""
        self._stop_accepting()

    def watch(self, fd):
        """Make ``run`` return when ``fd`` is readable (see the spec)."""
        fd = fileno_of(fd)
        if self.watch_tag != 0:
            raise ValueError("the loop watches one descriptor already")
        # A tag past every listener's and datagram socket's: never taken for one.
        tag = ((<uint64_t>(self.n_listeners + 1 + self.n_dgrams)) << 1) | 1
        self._ctl(posix.EPOLL_CTL_ADD, fd, posix.EPOLLIN, tag)
        self.watch_tag = tag

    def close(self):
        """Close every connection and the epoll set; listeners stay open."""
        while self.head != NULL:
            self._close(self.head, CLOSED_SHUTDOWN)
        self.holding = False
        self._flush_access_log()
        self.stop_accepting()
        self._release()

    def run(self, double timeout):
        """Serve for up to ``timeout`` seconds (see the spec)."""
        if self.epfd < 0:
            raise ValueError("event loop is closed")
        if self.holding:  # reads hold their own writes: what is held leaves first
            self.hold_writes(False)
        try:
            with nogil:
                self._run(timeout)
        finally:
            self._flush_access_log()  # the loop's tick

    # -- internals ------------------------------------------------------------------

    cdef void _release(self) noexcept:
        cdef Conn *conn
        while self.head != NULL:  # only after a failure: close() empties the list
            conn = self.head
            self.head = conn.next
            posix.close(conn.fd)
            if conn.ssl != NULL:
                openssl.SSL_free(conn.ssl)
            free(conn.pending)
            Py_XDECREF(conn.protocol)
            Py_XDECREF(conn.transport)
            Py_XDECREF(conn.header)
            Py_XDECREF(conn.peer)
            free(conn.access)
            free(conn)
        self._free_graveyard()
        free(self.alog)
        self.alog = NULL
        self.alog_fd = -1
        if self.epfd >= 0:
            posix.close(self.epfd)
            self.epfd = -1
        free(self.buf)
        self.buf = NULL
        free(self.listeners)
        self.listeners = NULL
        free(self.proxied)
        self.proxied = NULL
        free(self.secured)
        self.secured = NULL
        free(self.dgram_fds)
        self.dgram_fds = NULL
        free(self.dgram)
        self.dgram = NULL
        free(self.loop_ports)
        self.loop_ports = NULL

    cdef int _stop_accepting(self) except -1 nogil:
        cdef int i
        self._recycled = False
        if not self._accepting:
            return 0
        self._accepting = False
        self._disarm()
        for i in range(self.n_dgrams):
            self._ctl(posix.EPOLL_CTL_DEL, self.dgram_fds[i], 0, 0)
        self.n_dgrams = 0  # for good: a drain that resumes accepting leaves them out
        return 0

    cdef int _rearm(self) except -1 nogil:
        """Re-add every armed socket: see "Fair accept" in the spec."""
        cdef int i
        if self.armed:
            for i in range(self.n_listeners):
                self._readd(self.listeners[i], self._listener_tag(i))
        if self._accepting:
            for i in range(self.n_dgrams):
                self._readd(self.dgram_fds[i], self._dgram_tag(i))
        return 0

    cdef void _free_graveyard(self) noexcept nogil:
        cdef Conn *conn
        while self.graveyard != NULL:
            conn = self.graveyard
            self.graveyard = conn.next
            free(conn)

    cdef int _ctl(self, int op, int fd, unsigned int events, uint64_t tag) except -1 nogil:
        cdef posix.epoll_event ev
        ev.events = events
        ev.data.u64 = tag
        if posix.epoll_ctl(self.epfd, op, fd, &ev) < 0:
            _raise_oserror(posix.errno)
        return 0

    cdef int _run(self, double timeout) except -1 nogil:
        cdef double deadline = _monotonic() + timeout
        cdef double now, wait
        cdef int n, ms
        cdef bint woken
        self._rearm()
        while True:
            now = _monotonic()
            if self.draining and self._accepting:
                self._drain(now)
            self._arm_if_ready(now)
            if not self._accepting and self.n_active == 0:
                return 0
            if now >= self.next_sweep:
                self._sweep(now)
            wait = min(deadline, self.next_sweep) - now
            if self._accepting and not self.armed and self.paused_until > now:
                wait = min(wait, self.paused_until - now)
            if wait <= 0 and now >= deadline:
                return 0
            ms = <int>(wait * 1000.0 + 0.999) if wait > 0 else 0
            if self._return_soon:  # callbacks are waiting: look, do not wait
                ms = 0
            n = posix.epoll_wait(self.epfd, self.events, MAX_EVENTS, ms)
            if n < 0:
                if posix.errno != posix.EINTR:
                    _raise_oserror(posix.errno)
                _check_signals()
                continue
            now = _monotonic()
            if self.stats != NULL:
                self._publish(now)
            if self.svc == PROTOCOL:
                # A protocol's callbacks need the GIL: take it once for the
                # batch, not once per event (each `with gil` below is then a
                # counter's increment).
                with gil:
                    woken = self._dispatch(n, now)
            else:
                woken = self._dispatch(n, now)
            self._free_graveyard()
            if woken or self._return_soon:
                self._return_soon = False
                return 0

    cdef bint _dispatch(self, int n, double now) except -1 nogil:
        """Serve the ``n`` events epoll_wait returned; whether the loop was
        woken (its wake-up pipe or the watched descriptor)."""
        cdef bint woken = False
        cdef int i
        cdef uint64_t tag
        cdef Conn *conn
        self.handshakes = 0
        self.batch_now = now
        self.in_batch = True
        try:
            for i in range(n):
                tag = self.events[i].data.u64
                if tag & 1 == 0:
                    conn = <Conn *>self.events[i].data.ptr
                    if not conn.closed:
                        self._serve(conn, self.events[i].events, now)
                elif tag == self.watch_tag:
                    woken = True  # its owner reads it, between two runs
                elif <int>(tag >> 1) == self.n_listeners:
                    woken = True
                    self._drain_wakeup()
                elif <int>(tag >> 1) > self.n_listeners:
                    if self._accepting:
                        self._serve_datagrams(<int>(tag >> 1) - self.n_listeners - 1)
                elif self.armed:
                    self._accept(<int>(tag >> 1), now)
        finally:
            self.in_batch = False
        return woken

    cdef void _publish(self, double now) noexcept nogil:
        # The slot layout is prefork._fastio_common's SLOT; the counters in
        # the order of its LOOP_COUNTERS (COMPILED_FACTS says so, checked).
        cdef long long counters[N_COUNTERS]
        counters[0] = <long long>self.accepted
        counters[1] = self.n_active
        counters[2] = <long long>self.bytes_in
        counters[3] = <long long>self.bytes_out
        counters[4] = <long long>self.idle_closed
        counters[5] = <long long>self.max_buffer_closed
        counters[6] = <long long>self.handler_errors
        counters[7] = <long long>self.proxy_rejected
        counters[8] = <long long>self.udp_refused_loop
        counters[9] = <long long>self.udp_refused_source
        counters[10] = <long long>self.udp_refused_rate
        counters[11] = <long long>self.udp_rate_evictions
        counters[12] = <long long>self.limit_refused_conns
        counters[13] = <long long>self.limit_refused_rate
        counters[14] = <long long>self.limit_evictions
        memcpy(self.stats + HEARTBEAT_OFFSET, &now, sizeof(now))
        memcpy(self.stats + COUNTERS_OFFSET, counters, sizeof(counters))

    cdef void _drain_wakeup(self) noexcept nogil:
        cdef char sink[512]
        while posix.read(self.wakeup_fd, sink, sizeof(sink)) > 0:
            pass

    cdef int _arm_if_ready(self, double now) except -1 nogil:
        cdef bint want = (self._accepting and self.n_active < self.max_connections
                          and now >= self.paused_until and not self.draining)
        cdef int i
        if want and not self.armed:
            for i in range(self.n_listeners):
                self._ctl(posix.EPOLL_CTL_ADD, self.listeners[i],
                          posix.EPOLLIN | posix.EPOLLEXCLUSIVE, self._listener_tag(i))
            self.armed = True
        elif not want and self.armed:
            self._disarm()
        return 0

    cdef int _disarm(self) except -1 nogil:
        cdef int i
        if self.armed:
            for i in range(self.n_listeners):
                self._ctl(posix.EPOLL_CTL_DEL, self.listeners[i], 0, 0)
            self.armed = False
        return 0

    cdef int _sweep(self, double now) except -1 nogil:
        cdef Conn *conn = self.head
        cdef Conn *next_conn
        cdef double limit = now - self.idle_timeout
        self.next_sweep = now + self.sweep_interval
        if self.idle_timeout <= 0 and self.tls_ctx == NULL:
            return 0
        while conn != NULL:
            next_conn = conn.next
            if conn.ssl != NULL and not conn.tls_ready and now >= conn.tls_deadline:
                self._close(conn, CLOSED_TLS)  # no handshake in time
            elif self.idle_timeout > 0 and conn.last_active <= limit:
                self.idle_closed += 1
                self._close(conn, CLOSED_IDLE)
            conn = next_conn
        return 0

    # -- datagrams --------------------------------------------------------------------

    cdef inline uint64_t _listener_tag(self, int index) noexcept nogil:
        return ((<uint64_t>index) << 1) | 1

    cdef int _readd(self, int fd, uint64_t tag) except -1 nogil:
        """Remove and re-add an exclusive socket: to the back of its wait queue."""
        self._ctl(posix.EPOLL_CTL_DEL, fd, 0, 0)
        self._ctl(posix.EPOLL_CTL_ADD, fd, posix.EPOLLIN | posix.EPOLLEXCLUSIVE, tag)
        return 0

    cdef inline uint64_t _dgram_tag(self, int index) noexcept nogil:
        return ((<uint64_t>(self.n_listeners + 1 + index)) << 1) | 1

    cdef unsigned int _random_size(self) noexcept nogil:
        self.rng ^= self.rng << 13
        self.rng ^= self.rng >> 7
        self.rng ^= self.rng << 17
        return <unsigned int>(self.rng % (CHARGEN_DATAGRAM_MAX + 1))

    cdef int _serve_datagrams(self, int index) except -1 nogil:
        """Answer a batch of datagrams, each to its own sender (see the spec):
        one recvmmsg for the batch, then sendmmsg for the replies. A receive
        error takes a place in the batch and the batch reads on, as in the
        spec; EAGAIN ends it."""
        cdef Datagrams *d = self.dgram
        cdef int fd = self.dgram_fds[index]
        cdef int n, i, m = 0, r, done = 0, errors = 0, err
        cdef size_t length
        cdef posix.time_t t
        cdef posix.tm parts
        cdef const unsigned char *reply
        while True:
            for i in range(DATAGRAM_BATCH - errors):
                d.in_iov[i].iov_base = d.data[i]
                d.in_iov[i].iov_len = DATAGRAM_SIZE
                d.received[i].msg_hdr.msg_name = &d.senders[i]
                d.received[i].msg_hdr.msg_namelen = sizeof(posix.sockaddr_storage)
                d.received[i].msg_hdr.msg_iov = &d.in_iov[i]
                d.received[i].msg_hdr.msg_iovlen = 1
                d.received[i].msg_hdr.msg_control = NULL
                d.received[i].msg_hdr.msg_controllen = 0
                d.received[i].msg_hdr.msg_flags = 0
            n = posix.recvmmsg(fd, d.received, DATAGRAM_BATCH - errors, posix.MSG_DONTWAIT, NULL)
            if n >= 0:
                break
            err = posix.errno
            if err == posix.EINTR:
                _check_signals()
                if not self._accepting:  # the handler stopped us, closed the socket
                    return 0
                continue
            n = 0
            if err == posix.EAGAIN or err == posix.EWOULDBLOCK:
                break  # none left (another worker may have taken them)
            # An error the socket reports once (ECONNREFUSED after an ICMP
            # port unreachable, on a connected socket or with IP_RECVERR).
            errors += 1
            if errors == DATAGRAM_BATCH:
                break
        for i in range(n):
            length = d.received[i].msg_len
            self.datagrams += 1
            self.bytes_in += length
            if self._refuse(&d.senders[i], d.received[i].msg_hdr.msg_namelen):
                continue  # no reply: it could feed a loop or reflect
            if (self.udp_rate.table != NULL and self.svc != DISCARD
                    and not self._admit(&d.senders[i])):
                continue  # over the rate limit: no reply
            if d.received[i].msg_hdr.msg_flags & posix.MSG_TRUNC:
                continue  # cannot happen with 64 KiB buffers; never echo a cut datagram
            if self.svc == ECHO:
                reply = d.data[i]
            elif self.svc == DAYTIME:
                t = posix.time(NULL)
                posix.gmtime_r(&t, &parts)
                length = posix.strftime(<char *>d.data[i], DATAGRAM_SIZE, self.daytime_fmt, &parts)
                reply = d.data[i]
            elif self.svc == CHARGEN:
                length = min(<size_t>self._random_size(), self.pattern_len)
                reply = self.pattern
            else:
                continue  # discard
            d.out_iov[m].iov_base = <void *>reply
            d.out_iov[m].iov_len = length
            d.replies[m].msg_hdr = d.received[i].msg_hdr
            d.replies[m].msg_hdr.msg_iov = &d.out_iov[m]
            d.replies[m].msg_hdr.msg_flags = 0
            m += 1
        while done < m:
            r = posix.sendmmsg(fd, &d.replies[done], m - done, posix.MSG_DONTWAIT)
            if r < 0:
                if posix.errno == posix.EINTR:
                    _check_signals()
                    if not self._accepting:  # the handler stopped us, closed the socket
                        return 0
                    continue
                if posix.errno == posix.EAGAIN or posix.errno == posix.EWOULDBLOCK:
                    break  # full: UDP may drop the rest
                done += 1  # this reply failed (refused...): skip it
                continue
            for i in range(done, done + r):
                self.bytes_out += d.out_iov[i].iov_len
            done += r
        if not self._accepting:
            return 0
        self._readd(fd, self._dgram_tag(index))  # to the back of the socket's wait queue
        return 0

    cdef bint _refuse(self, posix.sockaddr_storage *sender,
                      posix.socklen_t length) noexcept nogil:
        """The UDP guard (the spec's datagram_refusal): count and remember a
        sender whose datagram must go unanswered, and say so."""
        cdef int reason = _refusal(sender, length, self.loop_ports, self.n_loop_ports,
                                   self.allow_low_ports)
        if reason == ANSWER:
            return False
        if reason == REFUSED_LOOP:
            self.udp_refused_loop += 1
        else:
            self.udp_refused_source += 1
        memcpy(&self.refused_from[reason], sender, sizeof(posix.sockaddr_storage))
        return True

    cdef bint _admit(self, posix.sockaddr_storage *sender) noexcept nogil:
        """The rate limit (the spec's rate_admit): whether a reply may go to
        ``sender``'s prefix now; counts refusals and evictions."""
        cdef uint64_t family, prefix
        cdef const unsigned char *a
        cdef bint evicted
        if sender.ss_family == posix.AF_INET:
            a = <const unsigned char *>&(<const posix.sockaddr_in *>sender).sin_addr
            family = 4
            prefix = _be(a, 4) & self.rate_mask4
        elif sender.ss_family == posix.AF_INET6:
            a = <const unsigned char *>&(<const posix.sockaddr_in6 *>sender).sin6_addr
            if _be(a, 8) == 0 and _be(a + 8, 4) == 0xFFFF:  # IPv4-mapped
                family = 4
                prefix = _be(a + 12, 4) & self.rate_mask4
            else:
                family = 6
                prefix = _be(a, 8) & self.rate_mask6
        else:
            return True
        if _rate_take(&self.udp_rate, family, prefix, _monotonic_ns(), &evicted):
            self.udp_rate_evictions += evicted
            return True
        self.udp_rate_evictions += evicted
        self.udp_refused_rate += 1
        memcpy(&self.refused_from[<int>REFUSED_RATE], sender, sizeof(posix.sockaddr_storage))
        return False

    # -- the per-client limits ------------------------------------------------------

    cdef LimitRefusal _admit_client(self, Conn *conn, uint64_t high,
                                    uint64_t low) noexcept nogil:
        """The spec's ClientLimits.admit for a new connection of client
        ``(high, low)``: ADMITTED (``conn`` is counted if the concurrency
        limit is on), or why not (counted)."""
        cdef int64_t in_use, total = 0
        cdef int slot, way
        cdef ClientEntry *entry
        cdef ClientEntry *found
        cdef ClientEntry *victim
        cdef bint evicted = False, allowed
        cdef LimitRefusal refusal = ADMITTED
        if self.clients != NULL:
            in_use = (<int64_t *>self.clients)[0]
            for slot in range(<int>in_use):
                found = _client_find(
                    _client_set(self.clients, slot, self.client_entries, high, low), high, low)
                if found != NULL:
                    total += found.count
            if total >= self.conn_limit:
                refusal = LIMIT_CONNS
        if refusal == ADMITTED and self.conn_rate.table != NULL:
            if high == 0 and (low >> 32) == 0xFFFF:  # the spec's client_rate_key
                allowed = _rate_take(&self.conn_rate, 4, low & <uint64_t>0xFFFFFFFF,
                                     _monotonic_ns(), &evicted)
            else:
                allowed = _rate_take(&self.conn_rate, 6, high, _monotonic_ns(), &evicted)
            self.limit_evictions += evicted
            if not allowed:
                refusal = LIMIT_RATE
        if refusal != ADMITTED:
            if refusal == LIMIT_CONNS:
                self.limit_refused_conns += 1
            else:
                self.limit_refused_rate += 1
            self.limit_from[<int>refusal][0] = high
            self.limit_from[<int>refusal][1] = low
            self.limit_from_set[<int>refusal] = True
            return refusal
        if self.clients == NULL:
            return ADMITTED
        entry = _client_set(self.clients, self.conn_slot, self.client_entries, high, low)
        found = _client_find(entry, high, low)
        if found != NULL:
            found.count += 1
        else:  # the free entry, or the one with the fewest connections
            victim = entry
            for way in range(1, CLIENT_WAYS):
                if entry[way].count < victim.count:
                    victim = &entry[way]
            if victim.count > 0:
                self.limit_evictions += 1  # those connections are forgotten: counted
            victim.count = 0  # the count last, after the address
            victim.high = high
            victim.low = low
            victim.count = 1
        conn.held = True
        conn.key_high = high
        conn.key_low = low
        return ADMITTED

    cdef void _release_client(self, Conn *conn) noexcept nogil:
        """``conn`` ended: one connection fewer for its client (the spec's
        client_release)."""
        cdef ClientEntry *found
        conn.held = False
        found = _client_find(
            _client_set(self.clients, self.conn_slot, self.client_entries,
                        conn.key_high, conn.key_low),
            conn.key_high, conn.key_low)
        if found != NULL:  # NULL: evicted meanwhile
            found.count -= 1

    # -- connections ------------------------------------------------------------------

    cdef int _accept_one(self, int lfd, posix.sockaddr_storage *addr) noexcept nogil:
        """accept4 on ``lfd``; the peer's address into ``addr`` only with an
        access log (it is the log's client) or a per-client limit."""
        cdef posix.socklen_t length = sizeof(posix.sockaddr_storage)
        if self.alog_fd < 0 and not self.limits_on:
            return posix.accept4(lfd, NULL, NULL, posix.SOCK_NONBLOCK | posix.SOCK_CLOEXEC)
        addr.ss_family = 0  # stays so if the kernel gives no address
        return posix.accept4(lfd, <posix.sockaddr *>addr, &length,
                             posix.SOCK_NONBLOCK | posix.SOCK_CLOEXEC)

    cdef int _drain(self, double now) except -1 nogil:
        """Take what is queued, as room allows; stop once the queues are empty."""
        cdef int i, fd, err, empty = 0
        cdef posix.sockaddr_storage addr
        for i in range(self.n_listeners):
            while self.n_active < self.max_connections and self.drained < DRAIN_MAX:
                fd = self._accept_one(self.listeners[i], &addr)
                if fd < 0:
                    err = posix.errno
                    if err == posix.EINTR:
                        _check_signals()
                        if not self._accepting:
                            return 0
                        continue
                    if err == posix.ECONNABORTED:
                        continue
                    if err == posix.EAGAIN or err == posix.EWOULDBLOCK:
                        empty += 1
                    break  # EMFILE and kin: try again at the next turn
                self.drained += 1
                self._open(fd, now, self.proxied[i], self.secured[i], &addr)
        if empty == self.n_listeners or self.drained >= DRAIN_MAX:
            self.draining = False
            self._stop_accepting()
        return 0

    cdef int _accept(self, int index, double now) except -1 nogil:
        cdef int lfd = self.listeners[index]
        cdef int fd, err, k
        cdef posix.sockaddr_storage addr
        for k in range(ACCEPT_BATCH):
            if self.n_active >= self.max_connections:
                break
            if self.max_accepts and self.accepted >= self.max_accepts:
                self._stop_accepting()  # recycled: serve what we have, then end
                self._recycled = True
                return 0
            fd = self._accept_one(lfd, &addr)
            if fd < 0:
                err = posix.errno
                if err == posix.EINTR:
                    _check_signals()
                    if not self._accepting:  # the handler stopped us, closed the listener
                        return 0
                    continue
                if err == posix.EAGAIN or err == posix.EWOULDBLOCK or err == posix.ECONNABORTED:
                    break
                if (err == posix.EMFILE or err == posix.ENFILE or err == posix.ENOBUFS
                        or err == posix.ENOMEM):
                    self.resource_errors += 1
                    self.paused_until = now + C_EMFILE_PAUSE
                    self._disarm()
                    return 0
                _raise_oserror(err)
            self._open(fd, now, self.proxied[index], self.secured[index], &addr)
        if self.armed:  # re-arm: to the back of the listener's wait queue
            self._readd(lfd, self._listener_tag(index))
        return 0

    cdef int _open(self, int fd, double now, bint proxied, bint secure,
                   const posix.sockaddr_storage *addr) except -1 nogil:
        cdef Access *access = NULL
        cdef Conn *conn
        cdef uint64_t high, low
        if self.alog_fd >= 0:
            access = <Access *>calloc(1, sizeof(Access))
            if access == NULL:
                posix.close(fd)
                return 0
            access.started = now
            _format_client(addr, access.client)
        conn = <Conn *>calloc(1, sizeof(Conn))
        if conn == NULL:
            free(access)
            posix.close(fd)
            return 0  # like a connection the peer aborted: the worker lives on
        conn.access = access
        conn.fd = fd
        conn.secure = secure
        conn.reading = True
        conn.last_active = now
        conn.next = self.head
        if self.head != NULL:
            self.head.prev = conn
        self.head = conn
        self.n_active += 1
        self.accepted += 1
        if self.limits_on and not proxied and _sockaddr_key(addr, &high, &low):
            if self._admit_client(conn, high, low) != ADMITTED:
                self._close_quietly(conn, END_LIMIT)  # before any byte is served
                return 0
        if proxied:
            with gil:
                self._expect_header(conn)  # the service starts once it is read
        else:
            self._start(conn)
        if not conn.closed:
            self._update(conn)
        return 0

    cdef int _expect_header(self, Conn *conn) except -1:
        """A PROXY listener's connection: turn away untrusted peers, else
        start collecting the header."""
        peer = peer_of_fd(conn.fd)
        if self.proxy_trusted is not None and not self.proxy_trusted(peer):
            _log.warning("PROXY protocol: %s is not in --forwarded-allow-ips; closing", peer)
            self.proxy_rejected += 1
            self._close_quietly(conn, END_PROXY)
            return 0
        header = bytearray()
        conn.header = <PyObject *>header
        Py_INCREF(header)
        return 0

    cdef int _start(self, Conn *conn) except -1 nogil:
        """The service's first move on a new connection (no epoll update); on
        a TLS connection, the handshake's first, and the service's once it is done."""
        cdef char line[128]
        cdef posix.time_t t
        cdef posix.tm parts
        cdef size_t length
        if conn.secure and not conn.tls_ready:
            return self._begin_tls(conn)
        if self.svc == DAYTIME:
            t = posix.time(NULL)
            posix.gmtime_r(&t, &parts)
            length = posix.strftime(line, sizeof(line), self.daytime_fmt, &parts)
            conn.reading = False
            self._write(conn, <unsigned char *>line, length)
            if not conn.closed:
                self._close_when_flushed(conn)
        elif self.svc == PROTOCOL:
            with gil:
                self._open_protocol(conn)
        return 0

    # -- TLS: OpenSSL on the socket (see the spec's _begin_tls and _handshake) ------------

    cdef int _begin_tls(self, Conn *conn) except -1 nogil:
        cdef int one = 1
        # A TLS write is several records, written one by one: without
        # TCP_NODELAY the last short segment waits for the peer's delayed ACK
        # (40 ms per 64 KiB message measured). A UNIX socket refuses it: fine.
        posix.setsockopt(conn.fd, posix.IPPROTO_TCP, posix.TCP_NODELAY, &one, sizeof(one))
        conn.ssl = openssl.SSL_new(self.tls_ctx)
        if conn.ssl == NULL:
            openssl.ERR_clear_error()
            self._close(conn, posix.ENOMEM)
            return 0
        # Partial writes and a moving buffer: what OpenSSL did not take stays
        # in the connection's pending bytes and is offered again from there.
        # Released buffers: an idle TLS connection keeps no 34 KiB of them.
        openssl.SSL_set_mode(conn.ssl, openssl.SSL_MODE_ENABLE_PARTIAL_WRITE
                             | openssl.SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
                             | openssl.SSL_MODE_RELEASE_BUFFERS)
        if openssl.SSL_set_fd(conn.ssl, conn.fd) != 1:
            openssl.ERR_clear_error()
            self._close(conn, posix.ENOMEM)
            return 0
        openssl.SSL_set_accept_state(conn.ssl)
        conn.tls_deadline = _monotonic() + self.tls_timeout
        return self._handshake(conn)  # the ClientHello may be there already

    cdef int _handshake(self, Conn *conn) except -1 nogil:
        """One step of the server's handshake; once done, the service starts."""
        cdef int r, e
        openssl.ERR_clear_error()
        r = openssl.SSL_do_handshake(conn.ssl)
        if r == 1:
            conn.tls_ready = True
            conn.tls_want_out = False
            conn.last_active = _monotonic()
            return self._start(conn)
        e = openssl.SSL_get_error(conn.ssl, r)
        openssl.ERR_clear_error()
        if e == openssl.SSL_ERROR_WANT_READ:
            conn.tls_want_out = False
        elif e == openssl.SSL_ERROR_WANT_WRITE:
            conn.tls_want_out = True
        else:  # a bad or truncated handshake, a reset, the peer gone
            self._close(conn, CLOSED_TLS)
        return 0

    cdef ssize_t _tls_recv(self, Conn *conn) except -2 nogil:
        """``_recv`` on a TLS connection: plaintext bytes read into the shared
        buffer, 0 at the end (close_notify, or an end of file: the context
        sets OP_IGNORE_UNEXPECTED_EOF), -EAGAIN, or -errno (-EPROTO: TLS failed)."""
        cdef int r, e
        openssl.ERR_clear_error()
        r = openssl.SSL_read(conn.ssl, self.buf, <int>min(self.read_size, C_INT_MAX))
        if r > 0:
            conn.tls_want_out = False
            return r
        e = openssl.SSL_get_error(conn.ssl, r)
        openssl.ERR_clear_error()
        if e == openssl.SSL_ERROR_WANT_READ:
            return -posix.EAGAIN
        if e == openssl.SSL_ERROR_WANT_WRITE:
            conn.tls_want_out = True
            return -posix.EAGAIN
        if e == openssl.SSL_ERROR_ZERO_RETURN:
            return 0
        if e == openssl.SSL_ERROR_SYSCALL and posix.errno != 0:
            return -posix.errno
        return -posix.EPROTO

    cdef ssize_t _tls_send(self, Conn *conn, const unsigned char *data,
                           size_t length) except -2 nogil:
        """``_send`` on a TLS connection: plaintext bytes OpenSSL took (0 if
        none: the rest is offered again, from the same bytes, when the socket
        takes more), or -errno before any (-EPROTO: TLS failed)."""
        cdef int r, e
        cdef size_t sent = 0
        while sent < length:
            openssl.ERR_clear_error()
            r = openssl.SSL_write(conn.ssl, data + sent, <int>min(length - sent, C_INT_MAX))
            if r > 0:
                sent += <size_t>r
                continue
            e = openssl.SSL_get_error(conn.ssl, r)
            openssl.ERR_clear_error()
            if e == openssl.SSL_ERROR_WANT_WRITE or e == openssl.SSL_ERROR_WANT_READ:
                break
            if sent > 0:
                break  # the next write reports it
            if e == openssl.SSL_ERROR_SYSCALL and posix.errno != 0:
                return -posix.errno
            return -posix.EPROTO
        return <ssize_t>sent

    cdef inline ssize_t _conn_send(self, Conn *conn, const unsigned char *data,
                                   size_t length) except -2 nogil:
        if conn.ssl != NULL:
            return self._tls_send(conn, data, length)
        return self._send(conn.fd, data, length)

    cdef inline ssize_t _conn_recv(self, Conn *conn) except -2 nogil:
        if conn.ssl != NULL:
            return self._tls_recv(conn)
        return self._recv(conn.fd, self.read_size)

    cdef int _open_protocol(self, Conn *conn) except -1:
        transport = Transport.__new__(Transport)
        sock = socket.socket(fileno=conn.fd)
        try:
            peer = peer_name(sock)
            extra = {"peername": peer, "sockname": sock.getsockname()}
            if conn.peer != NULL:  # behind a PROXY protocol balancer
                extra.update(peername=<object>conn.peer, proxy_peername=peer)
            (<Transport>transport)._extra = extra
        finally:
            sock.detach()
        (<Transport>transport)._loop = self
        (<Transport>transport)._conn = conn
        (<Transport>transport)._high = WRITE_HIGH_WATER
        conn.low_water = WRITE_LOW_WATER
        conn.transport = <PyObject *>transport
        Py_INCREF(transport)
        protocol = self._call(conn, self.factory, ())
        if conn.closed:
            return 0
        conn.protocol = <PyObject *>protocol
        Py_INCREF(protocol)
        conn.buffered = isinstance(protocol, asyncio.BufferedProtocol)
        self._call(conn, protocol, (transport,), "connection_made")
        return 0

    cdef object _call(self, Conn *conn, object func, tuple args, str method=None):
        """Call user code (``func``, or its ``method``); an exception, a
        missing method included, is logged and closes ``conn`` only."""
        try:
            if method is not None:
                func = getattr(func, method)
            return func(*args)
        except Exception as exc:
            self._handler_failed(conn, exc)
            return None

    cdef int _handler_failed(self, Conn *conn, exc) except -1:
        """Log what user code raised (called inside its ``except``: the
        traceback is logged) and close ``conn`` only."""
        self.handler_errors += 1
        if conn != NULL and not conn.closed:
            client = <object>conn.peer if conn.peer != NULL else peer_of_fd(conn.fd)
            _log.exception("handler failed; connection from %s closed", client)
            self._close_exc(conn, exc, END_HANDLER)
        else:
            _log.exception("handler failed")
        return 0

    cdef int _update(self, Conn *conn) except -1 nogil:
        """Make the epoll set wait for what ``conn`` needs now."""
        cdef unsigned int events = 0
        cdef bint owes = _owed(conn) > 0
        if conn.header != NULL:
            events = posix.EPOLLIN
        elif conn.secure and not conn.tls_ready:  # the handshake waits on one side
            events = posix.EPOLLOUT if conn.tls_want_out else posix.EPOLLIN
        else:
            if conn.reading and not owes and not conn.read_paused:
                events |= posix.EPOLLIN
            if owes or (self.svc == CHARGEN and not conn.eof) or conn.tls_want_out:
                events |= posix.EPOLLOUT
        if not conn.registered:
            self._ctl(posix.EPOLL_CTL_ADD, conn.fd, events, <uint64_t>conn)
            conn.registered = True
        elif conn.events != events:
            self._ctl(posix.EPOLL_CTL_MOD, conn.fd, events, <uint64_t>conn)
        conn.events = events
        return 0

    cdef int _close(self, Conn *conn, int err) except -1 nogil:
        """Close ``conn``; ``err`` > 0 is the errno that ended it, else a
        CLOSED_ code."""
        cdef int end
        if err > 0:
            end = END_TLS if err == posix.EPROTO and conn.ssl != NULL else END_RESET
        elif err == CLOSED_TLS:
            end = END_TLS
        elif err == CLOSED_OVERFLOW:
            end = END_MAX_BUFFER
        elif err == CLOSED_IDLE:
            end = END_IDLE
        elif err == CLOSED_SHUTDOWN:
            end = END_SHUTDOWN
        else:
            end = END_EOF if conn.peer_eof else END_CLOSED
        if conn.protocol == NULL:
            self._close_quietly(conn, end)
            return 0
        with gil:
            if err > 0:
                exc = OSError(err, os.strerror(err))
            elif err == CLOSED_OVERFLOW:
                exc = BufferError("max_buffer exceeded")
            else:
                exc = None
            self._close_exc(conn, exc, end)
        return 0

    cdef int _close_exc(self, Conn *conn, object exc, int end) except -1:
        """Close ``conn`` and tell its protocol (with the GIL)."""
        cdef PyObject *protocol = conn.protocol
        conn.protocol = NULL
        self._close_quietly(conn, end)
        if protocol != NULL:
            self._call(NULL, <object>protocol, (exc,), "connection_lost")
            Py_XDECREF(protocol)
        return 0

    cdef int _close_quietly(self, Conn *conn, int end) except -1 nogil:
        """Close ``conn``; ``end`` (an End) says why, for the access log."""
        if conn == self.cork_conn:
            if self.n_corked > 0:
                with gil:  # what its protocol wrote before: asyncio had sent it
                    self._uncork(True)
            self.cork_conn = NULL  # its Conn may take another connection
        if conn.access != NULL:
            self._log_access(conn, end)
            free(conn.access)
            conn.access = NULL
        if conn.held:
            self._release_client(conn)
        if conn.registered:
            self._ctl(posix.EPOLL_CTL_DEL, conn.fd, 0, 0)
            conn.registered = False
        if conn.ssl != NULL:
            if conn.tls_ready and end != END_TLS and end != END_RESET:
                openssl.ERR_clear_error()
                openssl.SSL_shutdown(conn.ssl)  # close_notify, not waiting for the peer's
            openssl.ERR_clear_error()
            openssl.SSL_free(conn.ssl)
            conn.ssl = NULL
        posix.close(conn.fd)
        if conn.prev != NULL:
            conn.prev.next = conn.next
        else:
            self.head = conn.next
        if conn.next != NULL:
            conn.next.prev = conn.prev
        self.n_active -= 1
        free(conn.pending)
        conn.pending = NULL
        conn.pending_len = conn.sent = conn.pending_cap = 0
        conn.closed = True
        conn.eof = True
        if conn.transport != NULL or conn.header != NULL or conn.peer != NULL:
            with gil:
                if conn.transport != NULL:
                    (<Transport>conn.transport)._loop = None
                    if (<Transport>conn.transport)._sock is not None:  # the fd is closed
                        (<Transport>conn.transport)._sock.detach()
                Py_XDECREF(conn.transport)
                Py_XDECREF(conn.header)
                Py_XDECREF(conn.peer)
            conn.transport = conn.header = conn.peer = NULL
        conn.next = self.graveyard
        self.graveyard = conn
        return 0

    cdef int _close_when_flushed(self, Conn *conn) except -1 nogil:
        conn.eof = True
        conn.reading = False
        if _owed(conn) == 0 and not conn.closed:
            self._close(conn, CLOSED_OK)
        return 0

    cdef ssize_t _send(self, int fd, const unsigned char *data, size_t length) except -2 nogil:
        """Bytes the kernel took (0 if none); -errno on a connection error
        before any. After a short send it tries again at once: the peer may
        have read meanwhile, and what it takes now need not wait a turn."""
        cdef ssize_t r
        cdef size_t sent = 0
        while sent < length:
            r = posix.send(fd, data + sent, length - sent, posix.MSG_NOSIGNAL)
            if r > 0:
                sent += <size_t>r
                continue
            if r < 0 and posix.errno == posix.EINTR:
                _check_signals()
                continue
            if (r < 0 and posix.errno != posix.EAGAIN and posix.errno != posix.EWOULDBLOCK
                    and sent == 0):
                return -posix.errno
            break  # EAGAIN, or an error after some bytes: the next send reports it
        return <ssize_t>sent

    cdef int _write(self, Conn *conn, const unsigned char *data, size_t length) except -1 nogil:
        """Send what the kernel takes now; keep the rest, up to max_buffer."""
        cdef ssize_t sent = 0
        cdef size_t owed = _owed(conn)
        if self.svc == PROTOCOL:  # a protocol writing is activity (echo's read was)
            # In a batch its time is as fresh as a read's; a timer's write
            # between two runs reads the clock.
            conn.last_active = self.batch_now if self.in_batch else _monotonic()
        if owed == 0:
            sent = self._conn_send(conn, data, length)
            if sent < 0:
                self._close(conn, <int>-sent)
                return 0
            self.bytes_out += <unsigned long long>sent
            if conn.access != NULL:
                conn.access.nout += <unsigned long long>sent
        if <size_t>sent == length:
            return 0
        return self._keep(conn, data + sent, length - <size_t>sent)

    cdef int _keep(self, Conn *conn, const unsigned char *data, size_t length) except -1 nogil:
        """Owe ``length`` more bytes to the peer, up to max_buffer, and wait
        for the socket to take them."""
        cdef size_t owed = _owed(conn)
        cdef size_t need
        cdef unsigned char *grown
        if owed + length > self.max_buffer:
            with gil:
                _log.warning("more than --max-buffer (%d bytes) owed to the peer; closing",
                             self.max_buffer)
            self.max_buffer_closed += 1
            self._close(conn, CLOSED_OVERFLOW)
            return 0
        if conn.sent > 0:  # move what is owed to the front
            memmove(conn.pending, conn.pending + conn.sent, owed)
            conn.pending_len = owed
            conn.sent = 0
        need = owed + length
        if need > conn.pending_cap:
            grown = <unsigned char *>realloc(conn.pending, need)
            if grown == NULL:
                self._close(conn, posix.ENOMEM)
                return 0
            conn.pending = grown
            conn.pending_cap = need
        memcpy(conn.pending + owed, data, length)
        conn.pending_len = need
        if conn.registered:
            self._update(conn)
        return 0

    cdef int _uncork(self, bint closing) except -1:
        """Send what the protocol of ``cork_conn`` wrote while it handled a
        read: one send for one write, one sendmsg for more (a protocol's
        connection is plaintext here: its TLS is asyncio's protocol over this
        transport). What the kernel does not take is owed, as from a write
        (and may pause the protocol); ``closing``: one try, the rest dropped,
        as asyncio's abort drops what is owed."""
        cdef Conn *conn = self.cork_conn
        cdef int k, n = self.n_corked
        cdef size_t total = self.corked_len
        cdef size_t start, size
        cdef ssize_t sent
        cdef posix.iovec iov[CORK_CHUNKS]
        cdef posix.msghdr msg
        if n == 0:
            return 0
        self.n_corked = 0
        self.corked_len = 0
        try:
            if conn.closed:
                return 0
            if n == 1:
                sent = self._send(conn.fd, <const unsigned char *>PyBytes_AS_STRING(
                    <object>self.corked[0]), total)
            else:
                for k in range(n):
                    iov[k].iov_base = PyBytes_AS_STRING(<object>self.corked[k])
                    iov[k].iov_len = <size_t>PyBytes_GET_SIZE(<object>self.corked[k])
                memset(&msg, 0, sizeof(msg))
                msg.msg_iov = iov
                msg.msg_iovlen = <size_t>n
                sent = self._sendmsg(conn.fd, &msg)
            if closing:
                return 0
            if sent < 0:
                self._close(conn, <int>-sent)
                return 0
            self.bytes_out += <unsigned long long>sent
            if conn.access != NULL:
                conn.access.nout += <unsigned long long>sent
            if <size_t>sent == total:
                return 0
            start = 0  # keep the rest, chunk by chunk, in order
            for k in range(n):
                size = <size_t>PyBytes_GET_SIZE(<object>self.corked[k])
                if start + size > <size_t>sent and not conn.closed:
                    if <size_t>sent > start:
                        self._keep(conn, <const unsigned char *>PyBytes_AS_STRING(
                            <object>self.corked[k]) + (<size_t>sent - start),
                            size - (<size_t>sent - start))
                    else:
                        self._keep(conn, <const unsigned char *>PyBytes_AS_STRING(
                            <object>self.corked[k]), size)
                start += size
            if (not conn.closed and not conn.write_paused and conn.transport != NULL
                    and _owed(conn) > (<Transport>conn.transport)._high):
                (<Transport>conn.transport)._pause_writing()
        finally:
            for k in range(n):
                Py_XDECREF(self.corked[k])
                self.corked[k] = NULL
        return 0

    cdef ssize_t _sendmsg(self, int fd, posix.msghdr *msg) except -2 nogil:
        """``_send`` of the iovecs in ``msg``, in one call (retried on EINTR)."""
        cdef ssize_t r
        while True:
            r = posix.sendmsg(fd, msg, posix.MSG_NOSIGNAL)
            if r >= 0:
                return r
            if posix.errno == posix.EINTR:
                _check_signals()
                continue
            if posix.errno == posix.EAGAIN or posix.errno == posix.EWOULDBLOCK:
                return 0
            return -posix.errno

    cdef int _serve(self, Conn *conn, unsigned int mask, double now) except -1 nogil:
        cdef int err = 0
        if conn.header != NULL:  # nothing else before the header is whole
            err = self._read_header(conn, now)
        elif conn.secure and not conn.tls_ready:
            if self.handshakes >= TLS_HANDSHAKES_PER_TURN:
                return 0  # the next turn: epoll reports it again
            self.handshakes += 1
            self._handshake(conn)
        else:
            if _owed(conn) > 0:
                err = self._flush(conn, now)
            elif self.svc == CHARGEN and mask & posix.EPOLLOUT:
                err = self._generate(conn, now)
            if (err == 0 and not conn.closed and _owed(conn) == 0
                    and (mask & ~(<unsigned int>posix.EPOLLOUT) or conn.tls_want_out)):
                if conn.reading:
                    err = self._read(conn, now)
                else:  # error or hang-up on a connection no longer read
                    self._close(conn, CLOSED_OK)
            # Plaintext OpenSSL decrypted and holds: epoll cannot see it, so
            # read it now, while nothing is owed. Without read-ahead OpenSSL
            # holds the rest of one record at most, so this ends; it must not
            # stop earlier, or a small read size leaves plaintext nobody wakes for.
            while (err == 0 and conn.ssl != NULL and not conn.closed and conn.reading
                    and _owed(conn) == 0 and openssl.SSL_pending(conn.ssl) > 0):
                err = self._read(conn, now)
        if err > 0 and not conn.closed:
            self._close(conn, err)
        if not conn.closed:
            self._update(conn)
        return 0

    cdef ssize_t _recv(self, int fd, size_t size) except -2 nogil:
        """Bytes read into the shared buffer, at most ``size`` (0 at end of
        file); -errno when none (-EAGAIN: nothing there now)."""
        cdef ssize_t r
        while True:
            r = posix.recv(fd, self.buf, size, 0)
            if r >= 0:
                return r
            if posix.errno != posix.EINTR:
                return -posix.errno
            _check_signals()

    # _read, _flush and _generate return 0, or an errno that ends the connection.

    cdef int _read(self, Conn *conn, double now) except -1 nogil:
        cdef ssize_t n
        if conn.buffered and conn.ssl == NULL:
            with gil:
                return self._read_buffered(conn, now)
        n = self._conn_recv(conn)
        if n == -posix.EAGAIN or n == -posix.EWOULDBLOCK:
            return 0
        if n < 0:
            return <int>-n
        if n == 0:
            self._end_of_file(conn)
            return 0
        conn.last_active = now
        return self._received(conn, n)

    cdef int _read_header(self, Conn *conn, double now) except -1 nogil:
        """Read towards a whole PROXY header; then start the service and hand
        it what came after the header."""
        cdef ssize_t n
        cdef Py_ssize_t rest
        cdef size_t size = self.read_size
        if conn.secure:  # not a byte past the header: the rest is OpenSSL's to read
            with gil:
                size = proxy.exact_read_size(bytes(<object>conn.header))
        n = self._recv(conn.fd, size)
        if n == -posix.EAGAIN or n == -posix.EWOULDBLOCK:
            return 0
        if n < 0:
            return <int>-n
        if n == 0:
            with gil:
                _log.debug("%s closed before its PROXY header", peer_of_fd(conn.fd))
            conn.peer_eof = True
            self._close(conn, CLOSED_OK)
            return 0
        conn.last_active = now
        with gil:
            rest = self._take_header(conn, n)
        if rest > 0 and not conn.closed and conn.reading:
            self._received(conn, rest)
        return 0

    cdef Py_ssize_t _take_header(self, Conn *conn, Py_ssize_t n) except -2:
        """Add ``n`` read bytes to the header; once it is whole, start the
        service and return how many bytes followed it (moved to the front of
        the read buffer). -1 while incomplete or once closed."""
        cdef Py_ssize_t rest
        header = <object>conn.header
        header.extend(self.buf[:n])
        try:
            parsed = proxy.parse(header)
        except proxy.ProxyHeaderError as exc:
            _log.warning("PROXY header from %s: %s; closing", peer_of_fd(conn.fd), exc)
            self.proxy_rejected += 1
            self._close_quietly(conn, END_PROXY)
            return -1
        if parsed is None:
            return -1
        rest = len(header) - parsed.length  # at most this read's n bytes
        if rest > 0:
            tail = bytes(header[parsed.length:])
            memcpy(self.buf, <const char *>tail, rest)
        conn.header = NULL
        Py_XDECREF(<PyObject *>header)
        if parsed.source is not None:
            source = parsed.source
            conn.peer = <PyObject *>source
            Py_INCREF(source)
            if conn.access != NULL:  # the log names the client, not the balancer
                client = format_client(source).encode("ascii", "replace")[:CLIENT_MAX - 1]
                memcpy(conn.access.client, <const char *>client, len(client))
                conn.access.client[len(client)] = 0
        if self.limits_on:  # by the client the balancer names (LOCAL: the balancer)
            key = client_key(parsed.source if parsed.source is not None else peer_of_fd(conn.fd))
            if key is not None and self._admit_client(conn, key[0], key[1]) != ADMITTED:
                self._close_quietly(conn, END_LIMIT)
                return -1
        self._start(conn)
        return rest

    cdef int _received(self, Conn *conn, ssize_t n) except -1 nogil:
        """Serve the ``n`` bytes at the start of the read buffer."""
        self.bytes_in += <unsigned long long>n
        if conn.access != NULL:
            conn.access.nin += <unsigned long long>n
        if self.svc == ECHO:
            self._write(conn, self.buf, <size_t>n)
        elif self.svc == PROTOCOL:
            with gil:
                self.cork_conn = conn
                try:
                    if conn.buffered:
                        self._give_buffered(conn, n)
                    else:
                        self._data_received(conn, n)
                finally:
                    self._uncork(False)
                    self.cork_conn = NULL
        return 0  # discard and chargen drop their input

    cdef int _data_received(self, Conn *conn, ssize_t n) except -1:
        """``_call`` of data_received, for every read: the method called
        without a bound method or an argument tuple made for it."""
        # The last read's bytes object, if the protocol let go of it (only
        # this loop holds it: here and in _spare) and it has this read's
        # length, takes this read: no allocation and no free per read, and
        # nobody can see the change. Any other read gets a new object.
        data = self._spare
        if data is not None and Py_REFCNT(data) == 2 and PyBytes_GET_SIZE(data) == n:
            memcpy(PyBytes_AS_STRING(data), self.buf, <size_t>n)
            prefork_forget_hash(data)
        else:
            data = PyBytes_FromStringAndSize(<const char *>self.buf, n)
            self._spare = data
        try:
            (<object>conn.protocol).data_received(data)
        except Exception as exc:
            self._handler_failed(conn, exc)
        return 0

    cdef int _flow_control(self, Conn *conn, str method) except -1:
        """pause_writing() or resume_writing(), if the protocol has them (see the spec)."""
        callback = getattr(<object>conn.protocol, method, None)
        if callback is not None:
            self._call(conn, callback, ())
        return 0

    cdef int _give_buffered(self, Conn *conn, ssize_t n) except -1:
        """An asyncio.BufferedProtocol: copy the ``n`` bytes read into the
        buffers it hands out, no bytes object per read (see the spec)."""
        cdef ssize_t given = 0
        cdef ssize_t taken
        cdef Py_buffer view
        protocol = <object>conn.protocol
        while given < n and not conn.closed:
            try:
                # Let go of the buffer before buffer_updated, as asyncio's
                # recv_into does: the protocol may resize its bytearray there.
                PyObject_GetBuffer(protocol.get_buffer(n - given), &view, PyBUF_WRITABLE)
                try:
                    if view.len == 0:
                        raise RuntimeError("get_buffer() returned an empty buffer")
                    taken = min(view.len, n - given)
                    memcpy(view.buf, self.buf + given, <size_t>taken)
                finally:
                    PyBuffer_Release(&view)
                protocol.buffer_updated(taken)
            except Exception as exc:
                self._handler_failed(conn, exc)
                return 0
            given += taken
        return 0

    cdef int _read_buffered(self, Conn *conn, double now) except -1:
        """A plaintext asyncio.BufferedProtocol (see the spec's
        _read_buffered): get_buffer(-1), as asyncio asks before each read, and
        one readv into that buffer first and the loop's buffer after it, up
        to read_size in all; then buffer_updated for what landed in the
        protocol's buffer, and what went past it is copied into the buffers
        it hands out next. Returns 0 or an errno that ends the connection."""
        cdef Py_buffer view
        cdef posix.iovec iov[2]
        cdef ssize_t n, direct
        cdef int err = 0
        protocol = <object>conn.protocol
        try:
            PyObject_GetBuffer(protocol.get_buffer(-1), &view, PyBUF_WRITABLE)
        except Exception as exc:
            self._handler_failed(conn, exc)
            return 0
        try:
            if view.len == 0:
                try:
                    raise RuntimeError("get_buffer() returned an empty buffer")
                except RuntimeError as exc:
                    self._handler_failed(conn, exc)
                    return 0
            # Once a read fills the protocol's buffer, one system call takes
            # as much as a plain read (read_size): reads bounded by the
            # protocol's buffer (64 KiB is usual) made bulk transfers fall
            # into a slow mode, in uvloop as here. Until then a recv into it
            # alone (readv costs a little more).
            iov[0].iov_base = view.buf
            iov[0].iov_len = <size_t>view.len
            iov[1].iov_base = self.buf
            iov[1].iov_len = 0
            if conn.read_wide and <size_t>view.len < self.read_size:
                iov[1].iov_len = self.read_size - <size_t>view.len
            while True:
                if iov[1].iov_len:
                    n = posix.readv(conn.fd, iov, 2)
                else:
                    n = posix.recv(conn.fd, view.buf, <size_t>view.len, 0)
                if n >= 0:
                    break
                err = posix.errno
                if err != posix.EINTR:
                    break
                _check_signals()
        finally:
            PyBuffer_Release(&view)  # before buffer_updated, as asyncio's recv_into
        if n < 0:
            return 0 if err == posix.EAGAIN or err == posix.EWOULDBLOCK else err
        if n == 0:
            self._end_of_file(conn)
            return 0
        conn.last_active = now
        self.bytes_in += <unsigned long long>n
        if conn.access != NULL:
            conn.access.nin += <unsigned long long>n
        direct = min(n, <ssize_t>iov[0].iov_len)
        conn.read_wide = direct == <ssize_t>iov[0].iov_len
        self.cork_conn = conn
        try:
            try:
                protocol.buffer_updated(direct)
            except Exception as exc:
                self._handler_failed(conn, exc)
                return 0
            if n > direct and not conn.closed:
                self._give_buffered(conn, n - direct)  # it starts at the loop's buffer
        finally:
            self._uncork(False)
            self.cork_conn = NULL
        return 0

    cdef int _end_of_file(self, Conn *conn) except -1 nogil:
        cdef bint keep_open = False
        conn.reading = False
        conn.peer_eof = True
        if self.svc == CHARGEN:
            return 0  # half-closed: the peer still reads the stream
        if self.svc == PROTOCOL:
            with gil:
                keep_open = bool(self._call(conn, <object>conn.protocol, (), "eof_received"))
        if not keep_open and not conn.closed:
            self._close_when_flushed(conn)  # flush what is owed, then close
        return 0

    cdef int _flush(self, Conn *conn, double now) except -1 nogil:
        cdef ssize_t sent = self._conn_send(conn, conn.pending + conn.sent, _owed(conn))
        if sent < 0:
            return <int>-sent
        if sent == 0:
            return 0
        conn.last_active = now
        self.bytes_out += <unsigned long long>sent
        if conn.access != NULL:
            conn.access.nout += <unsigned long long>sent
        conn.sent += <size_t>sent
        if conn.write_paused and _owed(conn) <= conn.low_water:
            conn.write_paused = False
            with gil:
                self._flow_control(conn, "resume_writing")
            if conn.closed:
                return 0
        if _owed(conn) == 0:
            conn.sent = conn.pending_len = 0
            if conn.eof:
                self._close(conn, CLOSED_OK)
            elif conn.shut_when_flushed:
                conn.shut_when_flushed = False
                if posix.shutdown(conn.fd, posix.SHUT_WR) < 0:
                    return posix.errno
        return 0

    cdef int _generate(self, Conn *conn, double now) except -1 nogil:
        cdef ssize_t sent = self._conn_send(conn, self.pattern + conn.offset,
                                       self.pattern_len - conn.offset)
        if sent < 0:
            return <int>-sent
        if sent == 0:
            return 0
        conn.last_active = now
        self.bytes_out += <unsigned long long>sent
        if conn.access != NULL:
            conn.access.nout += <unsigned long long>sent
        conn.offset = (conn.offset + <size_t>sent) % self.pattern_len
        return 0

    # -- the access log -------------------------------------------------------------
    # See the spec's _log_access and _flush_access_log: the same lines, the
    # same buffer rule, formatted and written here without the GIL.

    cdef void _log_access(self, Conn *conn, int end) noexcept nogil:
        cdef char line[256]
        cdef char stamp[32]
        cdef posix.timespec ts
        cdef posix.tm parts
        cdef int n
        cdef Access *a = conn.access
        posix.clock_gettime(posix.CLOCK_REALTIME, &ts)
        posix.gmtime_r(&ts.tv_sec, &parts)
        posix.strftime(stamp, sizeof(stamp), ACCESS_TIME_FMT, &parts)
        n = snprintf(line, sizeof(line), "%s.%03ldZ %s %d %.6f %llu %llu %s\n", stamp,
                     ts.tv_nsec // 1000000, a.client, self.pid, _monotonic() - a.started,
                     a.nin, a.nout, _end_name(end))
        if n <= 0 or <size_t>n >= sizeof(line):  # cannot happen: CLIENT_MAX bounds it
            self.access_log_dropped += 1
            return
        if self.alog_len + <size_t>n > ACCESS_LOG_BUFFER:
            self._flush_access_log()
            if self.alog_len + <size_t>n > ACCESS_LOG_BUFFER:
                self.access_log_dropped += 1
                return
        memcpy(self.alog + self.alog_len, line, <size_t>n)
        self.alog_len += <size_t>n

    cdef void _flush_access_log(self) noexcept nogil:
        """Write what the log takes now, without waiting; keep the rest."""
        cdef size_t done = 0, size
        cdef ssize_t r
        if self.alog_fd < 0:
            return
        while done < self.alog_len:
            size = self.alog_len - done
            if self.alog_pipe and size > ACCESS_PIPE_WRITE:
                size = ACCESS_PIPE_WRITE  # back to the end of the last whole line
                while size > 0 and self.alog[done + size - 1] != 10:  # "\n"
                    size -= 1
            if self.alog_socket:
                r = posix.send(self.alog_fd, self.alog + done, size,
                               posix.MSG_DONTWAIT | posix.MSG_NOSIGNAL)
            else:
                r = posix.write(self.alog_fd, self.alog + done, size)
            if r > 0:
                done += <size_t>r
            elif r < 0 and posix.errno == posix.EINTR:
                continue
            else:
                break  # full (EAGAIN), gone (EPIPE), no space...: later
        if done > 0:
            memmove(self.alog, self.alog + done, self.alog_len - done)
            self.alog_len -= done


cdef const char *ACCESS_TIME_FMT = b"%Y-%m-%dT%H:%M:%S"
COMPILED_FACTS["ACCESS_TIME_FORMAT"] = (<bytes>ACCESS_TIME_FMT).decode("ascii")
common.check_facts(__name__, COMPILED_FACTS, vars(common))


cdef void _format_client(const posix.sockaddr_storage *addr, char *out) noexcept nogil:
    """``format_client`` of an accepted peer's address, into CLIENT_MAX bytes."""
    cdef char host[48]
    cdef const posix.sockaddr_in *v4
    cdef const posix.sockaddr_in6 *v6
    if addr != NULL and addr.ss_family == posix.AF_INET:
        v4 = <const posix.sockaddr_in *>addr
        if posix.inet_ntop(posix.AF_INET, &v4.sin_addr, host, sizeof(host)) != NULL:
            snprintf(out, CLIENT_MAX, "%s:%u", host, <unsigned int>posix.ntohs(v4.sin_port))
            return
    elif addr != NULL and addr.ss_family == posix.AF_INET6:
        v6 = <const posix.sockaddr_in6 *>addr
        if posix.inet_ntop(posix.AF_INET6, &v6.sin6_addr, host, sizeof(host)) != NULL:
            snprintf(out, CLIENT_MAX, "[%s]:%u", host, <unsigned int>posix.ntohs(v6.sin6_port))
            return
    elif addr != NULL and addr.ss_family == posix.AF_UNIX:
        snprintf(out, CLIENT_MAX, "unix")
        return
    snprintf(out, CLIENT_MAX, "-")


cdef int _refusal(const posix.sockaddr_storage *addr, posix.socklen_t length,
                  const unsigned short *loop_ports, int n_loop_ports,
                  bint allow_low_ports) noexcept nogil:
    """``datagram_refusal`` of prefork._fastio_common in C: a Refusal, or
    ANSWER (also for what is not IPv4 or IPv6: a UNIX datagram peer)."""
    cdef const unsigned char *a
    cdef unsigned int port, i
    cdef bint bad = False
    cdef bint zero = True
    if length >= sizeof(posix.sockaddr_in) and addr.ss_family == posix.AF_INET:
        a = <const unsigned char *>&(<const posix.sockaddr_in *>addr).sin_addr
        port = posix.ntohs((<const posix.sockaddr_in *>addr).sin_port)
        bad = a[0] == 0 or a[0] >= 224
    elif length >= sizeof(posix.sockaddr_in6) and addr.ss_family == posix.AF_INET6:
        a = <const unsigned char *>&(<const posix.sockaddr_in6 *>addr).sin6_addr
        port = posix.ntohs((<const posix.sockaddr_in6 *>addr).sin6_port)
        for i in range(10):
            zero = zero and a[i] == 0
        if zero and a[10] == 0xFF and a[11] == 0xFF:  # IPv4-mapped: the IPv4 rule
            bad = a[12] == 0 or a[12] >= 224
        else:
            for i in range(10, 16):
                zero = zero and a[i] == 0
            bad = a[0] == 0xFF or zero
    else:
        return ANSWER
    if bad or port == 0:
        return REFUSED_SOURCE
    if port < LOW_PORT_LIMIT and not allow_low_ports:
        return REFUSED_LOOP
    for i in range(<unsigned int>n_loop_ports):
        if loop_ports[i] == port:
            return REFUSED_LOOP
    return ANSWER


# -- the -k asyncio worker's per-message path (see the spec's ConnectionCore) ------------
#
# The loop calls these for each read, the user's protocol for each write: as
# C, the worker's count and mark cost no interpreter frame of their own.


cdef class StreamCounts:
    """The bytes a ``-k asyncio`` worker's connections read and write (see the spec)."""

    cdef public unsigned long long bytes_in
    cdef public unsigned long long bytes_out


cdef class ConnectionCore:
    """What a ``-k asyncio`` connection does per message (see the spec)."""

    cdef public StreamCounts counts
    cdef public object inner
    cdef public object transport
    cdef public unsigned long long nin
    cdef public unsigned long long nout
    cdef public bint active
    cdef public double last_active
    cdef public bint closing
    cdef public object error

    def __init__(self, StreamCounts counts not None, inner):
        self.counts = counts
        self.inner = inner
        self.transport = None
        self.nin = 0
        self.nout = 0
        self.active = False
        self.last_active = _monotonic()
        self.closing = False
        self.error = None

    def fail(self, exc):
        raise NotImplementedError  # the subclass's: log, count, close

    def stream_received(self, data):
        cdef Py_ssize_t n = len(data)
        self.counts.bytes_in += <unsigned long long>n
        self.nin += <unsigned long long>n
        self.active = True
        try:
            self.inner.data_received(data)
        except Exception as exc:
            self.fail(exc)

    def buffered_update(self, Py_ssize_t nbytes):
        if self.error is not None:
            return  # the buffer was a stand-in: the connection is closing
        self.counts.bytes_in += <unsigned long long>nbytes
        self.nin += <unsigned long long>nbytes
        self.active = True
        try:
            self.inner.buffer_updated(nbytes)
        except Exception as exc:
            self.fail(exc)


def counted_write(self, data):
    """``write`` of the transport a ``-k asyncio`` user's protocol gets (see the spec)."""
    cdef ConnectionCore conn = self._conn
    cdef Py_ssize_t n
    transport = conn.transport
    if type(data) is bytes:
        n = PyBytes_GET_SIZE(data)
    else:
        n = memoryview(data).nbytes
    if n and not conn.closing:
        conn.counts.bytes_out += <unsigned long long>n
        conn.nout += <unsigned long long>n
        conn.active = True
    transport.write(data)


# -- the event worker's asyncio timers -----------------------------------------------------
#
# See prefork._fastio_py.TimerQueue. The heap orders three parallel arrays by
# (when, order): the whens and the push counts in C, the handles in a list
# (so the garbage collector sees them: a handle refers to its loop, which
# holds this queue). Comparing two timers is comparing two doubles.


cdef class TimerQueue:
    """The loop's timers, by ``when`` and then by the order they came in (see the spec)."""

    COMPACT_AFTER = 50

    cdef double *_whens
    cdef unsigned long long *_orders
    cdef list _handles
    cdef Py_ssize_t _size, _capacity
    cdef unsigned long long _count
    cdef readonly Py_ssize_t cancelled_count

    def __cinit__(self):
        self._handles = []

    def __dealloc__(self):
        free(self._whens)
        free(self._orders)

    def __len__(self):
        return self._size

    cdef inline bint _before(self, Py_ssize_t a, Py_ssize_t b) noexcept:
        return (self._whens[a] < self._whens[b]
                or (self._whens[a] == self._whens[b] and self._orders[a] < self._orders[b]))

    cdef inline void _swap(self, Py_ssize_t a, Py_ssize_t b) noexcept:
        cdef double when = self._whens[a]
        cdef unsigned long long order = self._orders[a]
        cdef PyObject *handle = PyList_GET_ITEM(self._handles, a)
        self._whens[a] = self._whens[b]
        self._orders[a] = self._orders[b]
        self._whens[b] = when
        self._orders[b] = order
        # Moving references inside the list: no count changes.
        PyList_SET_ITEM(self._handles, a, <object>PyList_GET_ITEM(self._handles, b))
        PyList_SET_ITEM(self._handles, b, <object>handle)

    cdef void _sift_up(self, Py_ssize_t i) noexcept:
        cdef Py_ssize_t parent
        while i > 0:
            parent = (i - 1) >> 1
            if not self._before(i, parent):
                break
            self._swap(i, parent)
            i = parent

    cdef void _sift_down(self, Py_ssize_t i) noexcept:
        cdef Py_ssize_t child
        while True:
            child = 2 * i + 1
            if child >= self._size:
                break
            if child + 1 < self._size and self._before(child + 1, child):
                child += 1
            if not self._before(child, i):
                break
            self._swap(i, child)
            i = child

    cdef int _grow(self) except -1:
        cdef Py_ssize_t capacity = self._capacity * 2 if self._capacity else 64
        cdef double *whens = <double *>realloc(self._whens, capacity * sizeof(double))
        if whens == NULL:
            raise MemoryError()
        self._whens = whens
        cdef unsigned long long *orders = <unsigned long long *>realloc(
            self._orders, capacity * sizeof(unsigned long long))
        if orders == NULL:
            raise MemoryError()
        self._orders = orders
        self._capacity = capacity
        return 0

    cdef object _pop(self):
        """Take the first timer off the heap (the heap is not empty)."""
        cdef Py_ssize_t last = self._size - 1
        if last > 0:
            self._swap(0, last)
        handle = self._handles.pop()
        self._size = last
        if last > 1:
            self._sift_down(0)
        return handle

    def push(self, handle):
        cdef double when = handle._when
        if (self.cancelled_count > self.COMPACT_AFTER
                and self.cancelled_count > self._size // 2):
            self._compact()
        if self._size == self._capacity:
            self._grow()
        self._count += 1
        self._handles.append(handle)
        self._whens[self._size] = when
        self._orders[self._size] = self._count
        self._size += 1
        self._sift_up(self._size - 1)
        handle._scheduled = True

    def cancelled(self, handle):
        if handle._scheduled:
            self.cancelled_count += 1

    def next_when(self):
        while self._size and self._handles[0]._cancelled:
            self._drop(self._pop())
        return self._whens[0] if self._size else float("inf")

    def pop_due(self, double now, ready):
        while self._size and self._whens[0] <= now:
            handle = self._pop()
            if handle._cancelled:
                self._drop(handle)
                continue
            handle._scheduled = False
            ready.append(handle)

    def clear(self):
        for handle in self._handles:
            handle._scheduled = False
        self._handles = []
        self._size = 0
        self.cancelled_count = 0

    cdef void _drop(self, handle) except *:
        handle._scheduled = False
        self.cancelled_count -= 1

    cdef int _compact(self) except -1:
        cdef list old = self._handles
        cdef Py_ssize_t i, n = self._size, kept = 0
        self._handles = []
        for i in range(n):
            handle = old[i]
            if handle._cancelled:
                handle._scheduled = False
                continue
            self._handles.append(handle)
            self._whens[kept] = self._whens[i]
            self._orders[kept] = self._orders[i]
            kept += 1
        self._size = kept
        self.cancelled_count = 0
        for i in range(kept // 2 - 1, -1, -1):
            self._sift_down(i)
        return 0
