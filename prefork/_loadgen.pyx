# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The load generator's loop, compiled: the fast copy of ``prefork._loadgen_py``.

``_loadgen_py`` is the specification (read its docstrings); this module keeps
the same state in C arrays and makes the same syscalls in the same order,
with the GIL released for a whole ``run`` slice, so the client costs a few
syscalls per message and no interpreter time.

Rules: this module imports nothing from ``prefork.server`` or
``prefork.tools``, and never its spec; what the two share comes from
``prefork._loadgen_common``, and what this module compiles in (the enums
below) is checked against it at import: ``COMPILED_FACTS``.

Bounds: checking is off. Every slot index comes from ``range(connections)``
or from an epoll tag we stored; a window position is below ``depth`` (a
datagram's claimed position is checked before use); every length passed to
``recv``/``send``/``memcmp`` is at most ``CHUNK``, the size of the receive
buffer, and an offset into what is sent (what must come back) is below its
period (``PERIOD``, or the request's or the reply's length), so ``offset +
length`` stays inside the ``period + CHUNK`` bytes of its buffer.

Signals: on ``EINTR`` from ``epoll_wait`` the loop takes the GIL and runs
``PyErr_CheckSignals``: Ctrl-C raises ``KeyboardInterrupt`` out of ``run``
between two events, with every counter consistent.
"""

import os

from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy

from prefork cimport _openssl as openssl
from prefork cimport _posix as posix

from prefork import _loadgen_common as common
from prefork._fastio_common import check_facts, enum_order
from prefork._loadgen_common import (
    ERROR_KINDS,
    MODES,
    check_args,
    check_exchange,
    check_tls_args,
    is_ip_address,
    make_pattern,
    repeated,
    sockaddr_bytes,
)

__all__ = ["LoadGen", "bucket_index"]

cdef extern from *:
    int __builtin_clzll(unsigned long long x) nogil

# The specification's numbers, by prefork._loadgen_common's names; checked
# against that module at import (COMPILED_FACTS below).
cdef enum:  # slot states
    IDLE, CONNECTING, OPEN, DEAD, HANDSHAKING
cdef enum:  # datagram window positions
    EMPTY, WAITING, ANSWERED, LOST
cdef enum:  # in the order of MODES
    MODE_STREAM, MODE_CONNECT, MODE_DATAGRAM
cdef enum:  # in the order of ERROR_KINDS
    E_CONNECT, E_RESET, E_CLOSED, E_MISMATCH, E_EXCESS, E_TIMEOUT, E_LOST, E_TLS, N_ERRORS
cdef enum:
    PERIOD = 251
    CHUNK = 65536
    DATAGRAM_BATCH = 16
    MAX_EVENTS = 256
    HEADER_SIZE = 8
    SUB_BITS = 5
    MAX_BITS = 42
    BUCKETS = (MAX_BITS - SUB_BITS + 1) << SUB_BITS
    SWEEP_INTERVAL_NS = 50000000
cdef enum:
    QUIET = -1  # a close that is no error

COMPILED_FACTS = {
    "IDLE": IDLE, "CONNECTING": CONNECTING, "OPEN": OPEN, "DEAD": DEAD,
    "HANDSHAKING": HANDSHAKING,
    "EMPTY": EMPTY, "WAITING": WAITING, "ANSWERED": ANSWERED, "LOST": LOST,
    "MODES": enum_order(
        {"stream": MODE_STREAM, "connect": MODE_CONNECT, "datagram": MODE_DATAGRAM}
    ),
    "ERROR_KINDS": enum_order({
        "connect": E_CONNECT, "reset": E_RESET, "closed": E_CLOSED, "mismatch": E_MISMATCH,
        "excess": E_EXCESS, "timeout": E_TIMEOUT, "lost": E_LOST, "tls": E_TLS,
    }),
    "PERIOD": PERIOD,
    "CHUNK": CHUNK,
    "DATAGRAM_BATCH": DATAGRAM_BATCH,
    "MAX_EVENTS": MAX_EVENTS,
    "SUB_BITS": SUB_BITS,
    "MAX_BITS": MAX_BITS,
    "BUCKETS": BUCKETS,
    "SWEEP_INTERVAL_NS": SWEEP_INTERVAL_NS,
    "HEADER_SIZE": HEADER_SIZE,
    "N_ERRORS": N_ERRORS,
}
check_facts(__name__, COMPILED_FACTS, vars(common))


cdef int _check_signals() except -1 with gil:
    PyErr_CheckSignals()
    return 0


cdef int _raise_oserror(int err) except -1 with gil:
    raise OSError(err, os.strerror(err))


cdef inline bint _unexpected_eof(int e) noexcept nogil:
    """OpenSSL 3's way to say the peer left without close_notify."""
    return (e == openssl.SSL_ERROR_SSL and openssl.ERR_GET_REASON(openssl.ERR_peek_error())
            == openssl.PREFORK_SSL_R_UNEXPECTED_EOF)


cdef inline bint _tls_ended(int e, int err) noexcept nogil:
    """Whether a failed SSL_read is the end of the stream, as Python's ssl
    reads it (a 0): close_notify, or an end without it (errno 0: EOF)."""
    return (e == openssl.SSL_ERROR_ZERO_RETURN or _unexpected_eof(e)
            or (e == openssl.SSL_ERROR_SYSCALL and err == 0))


cdef inline int _tls_failure(int e) noexcept nogil:
    """The error kind of a failed TLS read or write (the spec's
    ``_tls_failure``): E_TLS for a bad record, E_RESET for a lost connection."""
    if (e == openssl.SSL_ERROR_ZERO_RETURN or e == openssl.SSL_ERROR_SYSCALL
            or _unexpected_eof(e)):
        return E_RESET
    return E_TLS


cdef inline uint64_t _now() noexcept nogil:
    cdef posix.timespec ts
    posix.clock_gettime(posix.CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


cdef inline int _bucket(uint64_t ns) noexcept nogil:
    cdef int shift
    if ns < (1ULL << SUB_BITS):
        return <int>ns
    shift = 63 - __builtin_clzll(ns) - SUB_BITS  # bit_length - SUB_BITS - 1
    if shift > MAX_BITS - SUB_BITS - 1:
        return BUCKETS - 1
    return ((shift + 1) << SUB_BITS) + <int>(ns >> shift) - (1 << SUB_BITS)


def bucket_index(ns):
    """The histogram bucket of a latency of ``ns`` nanoseconds (see the spec)."""
    if ns < 0:
        raise ValueError("a latency cannot be negative")
    if ns >= 1 << 64:
        return BUCKETS - 1
    return _bucket(ns)


cdef struct Slot:
    int fd  # -1 when closed
    int state
    bint bad
    bint writing
    uint64_t since
    uint64_t out, queued, inp  # stream offsets
    uint64_t started, done  # messages
    openssl.SSL *ssl  # TLS: NULL until the handshake begins
    uint64_t retry  # TLS: the length of a write OpenSSL asked to repeat
    bint read_wants_out  # TLS: a read waits for the socket to be writable

cdef enum:
    INT_MAX_CHUNK = CHUNK  # an SSL_read/SSL_write length: CHUNK fits an int


cdef class LoadGen:
    """A closed-loop load generator against an echo server.

    See ``prefork._loadgen_py.LoadGen``.
    """

    cdef readonly int family
    cdef readonly object address
    cdef readonly str mode
    cdef readonly int connections
    cdef readonly unsigned long long size
    cdef readonly int depth
    cdef readonly double timeout
    cdef readonly unsigned long long messages, failed, bytes_sent, bytes_received
    cdef readonly unsigned long long connections_opened
    cdef readonly unsigned long long latency_min, latency_max, latency_total
    cdef readonly long long in_flight
    cdef readonly int live
    cdef readonly object tls  # the client ssl.SSLContext, or None
    cdef readonly object server_hostname
    cdef readonly object request, reply  # bytes of a request/reply run, or None (an echo)
    cdef openssl.SSL_CTX *_ctx  # tls's (kept alive by it); NULL: plain
    cdef bytes _name  # server_hostname, encoded as Python's ssl does
    cdef const char *_name_c  # its bytes (kept alive by _name), NULL without a name
    cdef bint _name_is_ip
    cdef bint _check_name
    cdef int _mode, _type, _epfd, _idle
    cdef bint _started
    cdef uint64_t _timeout_ns, _next_sweep
    cdef posix.sockaddr_storage _addr
    cdef posix.socklen_t _addrlen
    cdef Slot *_slots
    cdef uint64_t *_starts  # [slot * depth + position]
    cdef uint32_t *_seqs
    cdef unsigned char *_waits
    cdef unsigned long long *_histogram
    cdef unsigned long long _errors[N_ERRORS]
    cdef unsigned char *_pattern  # what is sent: _period + CHUNK bytes
    cdef unsigned char *_expected  # what must come back: _reply_period + CHUNK bytes
    cdef uint64_t _period, _reply_period, _reply_size
    cdef bint _echo  # no request/reply: the reply is what was sent
    cdef unsigned char *_buf  # CHUNK bytes
    cdef unsigned char *_datagram  # size bytes in datagram mode
    cdef posix.epoll_event _events[MAX_EVENTS]

    def __cinit__(self):
        self._epfd = -1

    def __init__(self, int family, address, str mode="stream", *, int connections=50,
                 size=1024, int depth=1, timeout=2.0, tls=None, server_hostname=None,
                 request=None, reply=None):
        cdef bytes raw
        cdef bytes pattern, expected
        cdef int i
        exchange = check_exchange(mode, request, reply)
        if exchange is not None:
            size = len(exchange[0])
        check_args(family, mode, connections, size, depth, timeout)
        check_tls_args(mode, tls, server_hostname)
        if tls is not None:
            self._ctx = openssl.context_ctx(tls)
            self._check_name = tls.check_hostname
            if server_hostname is not None:
                self._name_is_ip = is_ip_address(server_hostname)
                # As Python's ssl: a name in IDNA's ASCII form, an address as written.
                self._name = (server_hostname.encode("ascii") if self._name_is_ip
                              else server_hostname.encode("idna"))
                self._name_c = self._name
        self.tls = tls
        self.server_hostname = server_hostname
        if self._slots != NULL:
            raise RuntimeError("LoadGen.__init__ called twice")
        raw = sockaddr_bytes(family, address)
        if <size_t>len(raw) > sizeof(posix.sockaddr_storage):
            raise ValueError(f"address too long: {address!r}")
        memcpy(&self._addr, <const char *>raw, len(raw))
        self._addrlen = <posix.socklen_t>len(raw)
        self.family = family
        self.address = address
        self.mode = mode
        self._mode = MODES.index(mode)
        self._type = posix.SOCK_DGRAM if self._mode == MODE_DATAGRAM else posix.SOCK_STREAM
        self.connections = connections
        self.size = size
        self.depth = depth
        self.timeout = float(timeout)
        self._timeout_ns = <uint64_t>(self.timeout * 1e9)
        self._slots = <Slot *>calloc(connections, sizeof(Slot))
        self._starts = <uint64_t *>calloc(<size_t>connections * depth, sizeof(uint64_t))
        self._seqs = <uint32_t *>calloc(<size_t>connections * depth, sizeof(uint32_t))
        self._waits = <unsigned char *>calloc(<size_t>connections * depth, 1)
        self._histogram = <unsigned long long *>calloc(BUCKETS, sizeof(unsigned long long))
        self._echo = exchange is None
        if self._echo:
            self._period = self._reply_period = PERIOD
            self._reply_size = self.size
            pattern = expected = make_pattern(PERIOD + CHUNK)
        else:
            self.request, self.reply = exchange
            self._period = len(self.request)
            self._reply_period = self._reply_size = len(self.reply)
            pattern = repeated(self.request, self._period + CHUNK)
            expected = repeated(self.reply, self._reply_period + CHUNK)
        self._pattern = <unsigned char *>malloc(self._period + CHUNK)
        self._expected = <unsigned char *>malloc(self._reply_period + CHUNK)
        self._buf = <unsigned char *>malloc(CHUNK)
        self._datagram = <unsigned char *>malloc(self.size if self._mode == MODE_DATAGRAM else 1)
        if (self._slots == NULL or self._starts == NULL or self._seqs == NULL
                or self._waits == NULL or self._histogram == NULL or self._pattern == NULL
                or self._expected == NULL or self._buf == NULL or self._datagram == NULL):
            raise MemoryError()
        memcpy(self._pattern, <const char *>pattern, self._period + CHUNK)
        memcpy(self._expected, <const char *>expected, self._reply_period + CHUNK)
        if self._mode == MODE_DATAGRAM:
            memcpy(self._datagram, self._pattern, self.size)
        for i in range(connections):
            self._slots[i].fd = -1
            self._slots[i].state = IDLE
        self._epfd = posix.epoll_create1(posix.EPOLL_CLOEXEC)
        if self._epfd < 0:
            _raise_oserror(posix.errno)
        self.reset()

    def __dealloc__(self):
        cdef int i
        if self._slots != NULL:
            for i in range(self.connections):
                if self._slots[i].ssl != NULL:
                    openssl.SSL_free(self._slots[i].ssl)
                if self._slots[i].fd >= 0:
                    posix.close(self._slots[i].fd)
        if self._epfd >= 0:
            posix.close(self._epfd)
        free(self._slots)
        free(self._starts)
        free(self._seqs)
        free(self._waits)
        free(self._histogram)
        free(self._pattern)
        free(self._expected)
        free(self._buf)
        free(self._datagram)

    # -- counters -------------------------------------------------------------------

    def reset(self):
        """Zero the counters and the histogram (see the spec)."""
        cdef int i
        self.messages = self.failed = 0
        self.bytes_sent = self.bytes_received = 0
        self.connections_opened = 0
        self.latency_min = self.latency_max = self.latency_total = 0
        for i in range(N_ERRORS):
            self._errors[i] = 0
        for i in range(BUCKETS):
            self._histogram[i] = 0

    @property
    def errors(self):
        return {ERROR_KINDS[i]: self._errors[i] for i in range(N_ERRORS)}

    def histogram(self):
        """The count of messages per latency bucket (see ``bucket_index``)."""
        return [self._histogram[i] for i in range(BUCKETS)]

    cdef inline void _record(self, uint64_t now, uint64_t start) noexcept nogil:
        cdef uint64_t ns = now - start if now > start else 0
        self._histogram[_bucket(ns)] += 1
        self.latency_total += ns
        if self.messages == 1 or ns < self.latency_min:
            self.latency_min = ns
        if ns > self.latency_max:
            self.latency_max = ns

    # -- the loop -------------------------------------------------------------------

    def run(self, seconds, limit=0):
        """Run for up to ``seconds``; True once the run is over (see the spec)."""
        cdef uint64_t deadline
        cdef uint64_t c_limit
        cdef int finished
        if self._epfd < 0:
            raise ValueError("load generator is closed")
        if not 0 <= seconds < float("inf") or limit < 0:
            raise ValueError("seconds and limit must not be negative")
        c_limit = limit
        deadline = _now() + <uint64_t>(seconds * 1e9)
        with nogil:
            finished = self._run(deadline, c_limit)
        return finished == 1

    def close(self):
        """Close every socket and the epoll set."""
        cdef int i
        for i in range(self.connections):
            if self._slots[i].fd >= 0:
                self._close(i, True)
        if self._epfd >= 0:
            posix.close(self._epfd)
            self._epfd = -1

    cdef int _run(self, uint64_t deadline, uint64_t limit) except -1 nogil:
        cdef uint64_t now, wait
        cdef int n, i, ms
        if not self._started:
            self._started = True
            now = _now()
            self._next_sweep = now + SWEEP_INTERVAL_NS
            for i in range(self.connections):
                if self._mode != MODE_CONNECT:
                    self._open(i, now, limit)
                elif self._may_start(limit):
                    self._restart(i, now, limit)
                else:
                    self._idle += 1
        while True:
            now = _now()
            if self._idle:
                self._restart_idle(now, limit)
            if now >= self._next_sweep:
                self._sweep(now, limit)
                self._next_sweep = now + SWEEP_INTERVAL_NS
            if self._finished(limit):
                return 1
            if now >= deadline:
                return 0
            wait = min(deadline, self._next_sweep) - now
            ms = <int>((wait + 999999) // 1000000)
            n = posix.epoll_wait(self._epfd, self._events, MAX_EVENTS, ms)
            if n < 0:
                if posix.errno != posix.EINTR:
                    _raise_oserror(posix.errno)
                _check_signals()
                continue
            for i in range(n):
                self._serve(<int>self._events[i].data.u64, self._events[i].events, _now(),
                            limit)

    cdef inline bint _finished(self, uint64_t limit) noexcept nogil:
        if self.in_flight:
            return False
        if limit and self.messages + self.failed >= limit:
            return True
        return self.live == 0 and self._idle == 0

    cdef inline bint _may_start(self, uint64_t limit) noexcept nogil:
        return not limit or self.messages + self.failed + <uint64_t>self.in_flight < limit

    cdef int _ctl(self, int op, int fd, unsigned int events, int i) except -1 nogil:
        cdef posix.epoll_event ev
        ev.events = events
        ev.data.u64 = <uint64_t>i
        if posix.epoll_ctl(self._epfd, op, fd, &ev) < 0:
            _raise_oserror(posix.errno)
        return 0

    # -- opening and closing ----------------------------------------------------------

    cdef int _open(self, int i, uint64_t now, uint64_t limit) except -1 nogil:
        cdef Slot *slot = &self._slots[i]
        cdef int fd, err
        cdef int one = 1
        slot.since = now
        fd = posix.socket(self.family, self._type | posix.SOCK_NONBLOCK | posix.SOCK_CLOEXEC, 0)
        if fd < 0:
            self._errors[E_CONNECT] += 1
            self._lose(i)
            return 0
        if self.family != posix.AF_UNIX and self._type == posix.SOCK_STREAM:
            posix.setsockopt(fd, posix.IPPROTO_TCP, posix.TCP_NODELAY, &one, sizeof(one))
        slot.fd = fd
        self.live += 1
        err = 0
        if posix.connect(fd, <posix.sockaddr *>&self._addr, self._addrlen) < 0:
            err = posix.errno
        if err == posix.EINPROGRESS or err == posix.EINTR:
            slot.state = CONNECTING
            self._ctl(posix.EPOLL_CTL_ADD, fd, posix.EPOLLOUT, i)
            slot.writing = True
        elif err:
            self._fail(i, E_CONNECT)
        else:
            self._ctl(posix.EPOLL_CTL_ADD, fd, posix.EPOLLIN, i)
            slot.writing = False
            self._established(i, now, limit)
        return 0

    cdef int _established(self, int i, uint64_t now, uint64_t limit) except -1 nogil:
        """The connect succeeded: the TLS handshake begins, or the messages."""
        cdef Slot *slot = &self._slots[i]
        if self._ctx == NULL:
            return self._connected(i, now, limit)
        slot.state = HANDSHAKING
        slot.retry = 0
        slot.read_wants_out = False
        openssl.ERR_clear_error()
        slot.ssl = openssl.SSL_new(self._ctx)
        if slot.ssl == NULL or not self._configure(slot.ssl, slot.fd):
            openssl.ERR_clear_error()
            self._fail(i, E_TLS)
            return 0
        return self._handshake(i, now, limit)

    cdef bint _configure(self, openssl.SSL *ssl, int fd) noexcept nogil:
        """What Python's ssl does to a client socket it wraps: SNI for a name
        (never for an address), the name or address to verify when the
        context checks host names; and writes that may be partial, from a
        buffer that may move (a repeated write starts at the same byte)."""
        cdef const char *name = self._name_c
        openssl.SSL_set_mode(ssl, openssl.SSL_MODE_ENABLE_PARTIAL_WRITE
                             | openssl.SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
        if openssl.SSL_set_fd(ssl, fd) != 1:
            return False
        openssl.SSL_set_connect_state(ssl)
        if name == NULL:
            return True
        if not self._name_is_ip and openssl.SSL_set_tlsext_host_name(ssl, name) != 1:
            return False
        if self._check_name:
            if self._name_is_ip:
                return openssl.X509_VERIFY_PARAM_set1_ip_asc(openssl.SSL_get0_param(ssl), name) == 1
            return openssl.SSL_set1_host(ssl, name) == 1
        return True

    cdef int _handshake(self, int i, uint64_t now, uint64_t limit) except -1 nogil:
        """One step of the TLS handshake; once done, the connection is open."""
        cdef Slot *slot = &self._slots[i]
        cdef int r, e
        openssl.ERR_clear_error()
        r = openssl.SSL_do_handshake(slot.ssl)
        if r == 1:
            self._want(i, False)
            return self._connected(i, now, limit)
        e = openssl.SSL_get_error(slot.ssl, r)
        if e == openssl.SSL_ERROR_WANT_READ:
            self._want(i, False)
        elif e == openssl.SSL_ERROR_WANT_WRITE:
            self._want(i, True)
        else:  # refused, not verified, reset, closed
            openssl.ERR_clear_error()
            self._fail(i, E_TLS)
        return 0

    cdef int _want(self, int i, bint writing) except -1 nogil:
        """EPOLLOUT in the slot's interest or not (EPOLLIN always)."""
        cdef Slot *slot = &self._slots[i]
        if writing != slot.writing:
            self._ctl(posix.EPOLL_CTL_MOD, slot.fd,
                      posix.EPOLLIN | posix.EPOLLOUT if writing else posix.EPOLLIN, i)
            slot.writing = writing
        return 0

    cdef int _connected(self, int i, uint64_t now, uint64_t limit) except -1 nogil:
        cdef Slot *slot = &self._slots[i]
        cdef int position
        slot.state = OPEN
        self.connections_opened += 1
        if self._mode == MODE_DATAGRAM:
            for position in range(self.depth):
                if self._may_start(limit):
                    self._send_datagram(i, position, now)
            return 0
        if self._mode == MODE_STREAM:
            for position in range(self.depth):
                if self._may_start(limit):
                    self._start_message(slot, i, now)
        self._flush(i)
        return 0

    cdef int _restart(self, int i, uint64_t now, uint64_t limit) except -1 nogil:
        cdef Slot *slot = &self._slots[i]
        slot.out = slot.queued = slot.inp = slot.started = slot.done = 0
        slot.bad = False
        self._start_message(slot, i, now)
        self._open(i, now, limit)
        return 0

    cdef int _restart_idle(self, uint64_t now, uint64_t limit) except -1 nogil:
        cdef int i
        for i in range(self.connections):
            if self._slots[i].state == IDLE and self._may_start(limit):
                self._idle -= 1
                self._restart(i, now, limit)
        return 0

    cdef void _close(self, int i, bint polite=False) noexcept nogil:
        """Close the slot's socket; ``polite``: an open TLS connection sends
        its close_notify first (without waiting for the server's)."""
        cdef Slot *slot = &self._slots[i]
        if slot.ssl != NULL:
            if polite and slot.state == OPEN:
                openssl.ERR_clear_error()
                openssl.SSL_shutdown(slot.ssl)
            openssl.ERR_clear_error()
            openssl.SSL_free(slot.ssl)
            slot.ssl = NULL
        posix.close(slot.fd)  # leaves the epoll set with it
        slot.fd = -1
        self.live -= 1

    cdef void _lose(self, int i) noexcept nogil:
        cdef Slot *slot = &self._slots[i]
        cdef long long owed = 0
        cdef int position
        if self._mode == MODE_DATAGRAM:
            for position in range(self.depth):
                if self._waits[i * self.depth + position] == WAITING:
                    owed += 1
        else:
            owed = <long long>(slot.started - slot.done)
        self.failed += <unsigned long long>owed
        self.in_flight -= owed
        slot.started = slot.done
        if self._mode == MODE_CONNECT:
            slot.state = IDLE
            self._idle += 1
        else:
            slot.state = DEAD

    cdef void _fail(self, int i, int kind) noexcept nogil:
        if kind != QUIET:
            self._errors[kind] += 1
        self._close(i)
        self._lose(i)

    cdef int _sweep(self, uint64_t now, uint64_t limit) except -1 nogil:
        cdef uint64_t expired = now - self._timeout_ns if now > self._timeout_ns else 0
        cdef Slot *slot
        cdef int i, position, k
        for i in range(self.connections):
            slot = &self._slots[i]
            if (slot.state == CONNECTING or slot.state == HANDSHAKING) and slot.since < expired:
                self._fail(i, E_CONNECT if slot.state == CONNECTING else E_TLS)
            elif slot.state != OPEN:
                continue
            elif self._mode == MODE_DATAGRAM:
                for position in range(self.depth):
                    k = i * self.depth + position
                    if self._waits[k] == WAITING and self._starts[k] < expired:
                        self._waits[k] = LOST
                        self.in_flight -= 1
                        self.failed += 1
                        self._errors[E_LOST] += 1
                    if self._waits[k] != WAITING and self._may_start(limit):
                        self._send_datagram(i, position, now)
            elif (slot.started > slot.done
                    and self._starts[i * self.depth + <int>(slot.done % <uint64_t>self.depth)]
                    < expired):
                self._fail(i, E_TIMEOUT)
        return 0

    # -- streams ------------------------------------------------------------------------

    cdef int _serve(self, int i, uint32_t mask, uint64_t now, uint64_t limit) except -1 nogil:
        cdef Slot *slot = &self._slots[i]
        cdef int err = 0
        cdef posix.socklen_t length = sizeof(err)
        if slot.state == CONNECTING:
            if posix.getsockopt(slot.fd, posix.SOL_SOCKET, posix.SO_ERROR, &err, &length) < 0:
                err = posix.errno
            if err:
                self._fail(i, E_CONNECT)
                return 0
            self._ctl(posix.EPOLL_CTL_MOD, slot.fd, posix.EPOLLIN, i)
            slot.writing = False
            self._established(i, now, limit)
        elif slot.state == HANDSHAKING:
            self._handshake(i, now, limit)
        elif self._mode == MODE_DATAGRAM:
            self._receive_datagrams(i, limit)
        elif self._ctx != NULL:  # a read or a write may wait for either event
            self._receive_tls(i, now, limit)
        elif mask & posix.EPOLLOUT and not mask & posix.EPOLLIN:
            self._flush(i)
        else:  # readable, or an error or hang-up that recv reports
            self._receive(i, now, limit)
        return 0

    cdef inline void _start_message(self, Slot *slot, int i, uint64_t now) noexcept nogil:
        self._starts[i * self.depth + <int>(slot.started % <uint64_t>self.depth)] = now
        slot.started += 1
        slot.queued += self.size
        self.in_flight += 1

    cdef int _flush(self, int i) except -1 nogil:
        cdef Slot *slot = &self._slots[i]
        cdef uint64_t offset, length
        cdef ssize_t sent
        cdef int err
        cdef bint writing
        if self._ctx != NULL:
            return self._flush_tls(i)
        while slot.out < slot.queued:
            offset = slot.out % self._period
            length = min(slot.queued - slot.out, <uint64_t>CHUNK)
            sent = posix.send(slot.fd, self._pattern + offset, <size_t>length, posix.MSG_NOSIGNAL)
            if sent < 0:
                err = posix.errno
                if err == posix.EAGAIN or err == posix.EWOULDBLOCK:
                    break
                if err == posix.EINTR:
                    continue
                self._fail(i, E_RESET)
                return 0
            slot.out += <uint64_t>sent
            self.bytes_sent += <uint64_t>sent
        return self._want(i, slot.out < slot.queued)

    cdef int _flush_tls(self, int i) except -1 nogil:
        """``_flush`` over TLS (see the spec)."""
        cdef Slot *slot = &self._slots[i]
        cdef uint64_t offset, length
        cdef int r, e
        cdef bint blocked = False
        while slot.out < slot.queued:
            offset = slot.out % self._period
            length = slot.retry if slot.retry else min(slot.queued - slot.out, <uint64_t>CHUNK)
            openssl.ERR_clear_error()
            r = openssl.SSL_write(slot.ssl, self._pattern + offset, <int>length)
            if r <= 0:
                e = openssl.SSL_get_error(slot.ssl, r)
                if e == openssl.SSL_ERROR_WANT_WRITE or e == openssl.SSL_ERROR_WANT_READ:
                    slot.retry = length  # OpenSSL wants the same write again
                    blocked = e == openssl.SSL_ERROR_WANT_WRITE
                    break
                self._fail(i, _tls_failure(e))
                return 0
            slot.retry = 0
            slot.out += <uint64_t>r
            self.bytes_sent += <uint64_t>r
        return self._want(i, blocked or slot.read_wants_out)

    cdef int _receive(self, int i, uint64_t now, uint64_t limit) except -1 nogil:
        cdef Slot *slot = &self._slots[i]
        cdef ssize_t r
        cdef uint64_t n, position, take, offset
        cdef int err
        r = posix.recv(slot.fd, self._buf, CHUNK, 0)
        if r < 0:
            err = posix.errno
            if err == posix.EAGAIN or err == posix.EWOULDBLOCK or err == posix.EINTR:
                return 0  # level-triggered: it comes back
            self._fail(i, E_RESET)
            return 0
        if self._consume(i, <uint64_t>r, now, limit):
            self._flush(i)
        return 0

    cdef int _receive_tls(self, int i, uint64_t now, uint64_t limit) except -1 nogil:
        """``_receive`` over TLS (see the spec)."""
        cdef Slot *slot = &self._slots[i]
        cdef int r, e, err
        slot.read_wants_out = False
        while True:
            openssl.ERR_clear_error()
            r = openssl.SSL_read(slot.ssl, self._buf, INT_MAX_CHUNK)
            if r <= 0:
                err = posix.errno
                e = openssl.SSL_get_error(slot.ssl, r)
                if e == openssl.SSL_ERROR_WANT_READ:
                    break
                if e == openssl.SSL_ERROR_WANT_WRITE:
                    slot.read_wants_out = True
                    break
                if not _tls_ended(e, err):
                    self._fail(i, _tls_failure(e))
                    return 0
                r = 0  # close_notify, or an end without it: as Python's ssl reads it
            if not self._consume(i, <uint64_t>r, now, limit):
                return 0
            if openssl.SSL_pending(slot.ssl) <= 0:
                break
        return self._flush(i)

    cdef bint _consume(self, int i, uint64_t n, uint64_t now, uint64_t limit) except -1 nogil:
        """Check ``n`` received bytes and answer the messages they complete;
        False when the slot was closed (or, in connect mode, begun anew)."""
        cdef Slot *slot = &self._slots[i]
        cdef uint64_t position, take, offset
        if n == 0:
            self._fail(i, E_CLOSED if slot.started > slot.done else QUIET)
            return False
        self.bytes_received += n
        # An echo owes what was sent; a server with replies, one per message begun.
        cdef uint64_t owed = slot.out if self._echo else slot.started * self._reply_size
        if slot.inp + n > owed:
            self._fail(i, E_EXCESS)
            return False
        position = 0
        while position < n:
            take = min(n - position, self._reply_size - slot.inp % self._reply_size)
            offset = slot.inp % self._reply_period
            if not slot.bad and memcmp(self._buf + position, self._expected + offset,
                                       <size_t>take) != 0:
                slot.bad = True
                self._errors[E_MISMATCH] += 1
            position += take
            slot.inp += take
            if slot.inp % self._reply_size == 0:
                self._answered(i, now, limit)
                if self._mode == MODE_CONNECT:  # closed, and maybe a new connection begun
                    return False
        return True

    cdef int _answered(self, int i, uint64_t now, uint64_t limit) except -1 nogil:
        cdef Slot *slot = &self._slots[i]
        cdef uint64_t start = self._starts[i * self.depth + <int>(slot.done % <uint64_t>self.depth)]
        slot.done += 1
        self.in_flight -= 1
        if slot.bad:
            slot.bad = False
            self.failed += 1
        else:
            self.messages += 1
            self._record(now, start)
        if self._mode == MODE_CONNECT:
            self._close(i, True)
            if self._may_start(limit):
                self._restart(i, now, limit)
            else:
                slot.state = IDLE
                self._idle += 1
        elif self._may_start(limit):
            self._start_message(slot, i, now)
        return 0

    # -- datagrams ------------------------------------------------------------------

    cdef int _send_datagram(self, int i, int position, uint64_t now) except -1 nogil:
        cdef int k = i * self.depth + position
        cdef uint32_t header[2]
        cdef ssize_t sent
        cdef int err
        self._seqs[k] += 1  # wraps at 2**32, as the spec's & 0xFFFFFFFF
        header[0] = <uint32_t>position
        header[1] = self._seqs[k]
        memcpy(self._datagram, header, HEADER_SIZE)
        self._starts[k] = now
        self._waits[k] = WAITING
        self.in_flight += 1
        sent = posix.send(self._slots[i].fd, self._datagram, <size_t>self.size, 0)
        if sent < 0:
            err = posix.errno
            if err == posix.EAGAIN or err == posix.EWOULDBLOCK or err == posix.EINTR:
                return 0  # dropped here rather than on the way: it will count as lost
            self._waits[k] = EMPTY  # the next sweep sends another
            self.in_flight -= 1
            self.failed += 1
            self._errors[E_CONNECT] += 1
            return 0
        self.bytes_sent += <uint64_t>sent
        return 0

    cdef int _receive_datagrams(self, int i, uint64_t limit) except -1 nogil:
        cdef ssize_t r
        cdef int err, count
        for count in range(DATAGRAM_BATCH):
            r = posix.recv(self._slots[i].fd, self._buf, CHUNK, 0)
            if r < 0:
                err = posix.errno
                if err == posix.EAGAIN or err == posix.EWOULDBLOCK:
                    return 0
                if err != posix.EINTR:  # ECONNREFUSED: an ICMP error for an earlier datagram
                    self._errors[E_CONNECT] += 1
                continue
            self.bytes_received += <uint64_t>r
            # A fresh time for each: a reply to a datagram sent in this batch can be in it.
            self._check_reply(i, <uint64_t>r, _now(), limit)
        return 0

    cdef int _check_reply(self, int i, uint64_t n, uint64_t now, uint64_t limit) except -1 nogil:
        cdef uint32_t header[2]
        cdef uint32_t behind
        cdef int k
        if n < HEADER_SIZE:
            self._errors[E_MISMATCH] += 1
            return 0
        memcpy(header, self._buf, HEADER_SIZE)
        if header[0] >= <uint32_t>self.depth:
            self._errors[E_MISMATCH] += 1
            return 0
        k = i * self.depth + <int>header[0]
        behind = self._seqs[k] - header[1]  # modulo 2**32
        if behind >= <uint32_t>0x80000000:  # a sequence number not sent yet
            self._errors[E_MISMATCH] += 1
        elif behind or self._waits[k] == LOST:
            pass  # a late reply, already counted lost (or a copy of one)
        elif self._waits[k] == ANSWERED:
            self._errors[E_EXCESS] += 1
        elif self._waits[k] == EMPTY:  # its send failed: it never left
            self._errors[E_MISMATCH] += 1
        else:
            self._waits[k] = ANSWERED
            self.in_flight -= 1
            if n == self.size and memcmp(self._buf + HEADER_SIZE, self._pattern + HEADER_SIZE,
                                         <size_t>(n - HEADER_SIZE)) == 0:
                self.messages += 1
                self._record(now, self._starts[k])
            else:
                self.failed += 1
                self._errors[E_MISMATCH] += 1
            if self._may_start(limit):
                self._send_datagram(i, <int>header[0], now)
        return 0
