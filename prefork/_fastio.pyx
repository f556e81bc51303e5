# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The compiled hot loop: the fast copy of ``prefork._fastio_py``.

``_fastio_py`` is the specification (read its docstrings); this module makes
the same syscalls in the same order, but whole loops run with the GIL
released, so a worker with threads pays no GIL hand-off per message.

Bounds: checking is off, so every length handed to ``recv``/``send`` comes
from the validated buffer's own size, and pointer arithmetic only ever moves
by what the kernel reported it copied (``0 <= r <= n``).

Signals: a Python handler can only run with the GIL held, so on ``EINTR`` the
loop takes the GIL, runs ``PyErr_CheckSignals`` (which raises if a handler
raised) and otherwise retries, exactly as PEP 475 does for ``socket``.
"""

import os

from cpython.exc cimport PyErr_CheckSignals

from prefork._posix cimport (
    EAGAIN, ECONNABORTED, ECONNRESET, EINTR, EPIPE, EWOULDBLOCK, MSG_NOSIGNAL,
    SOCK_CLOEXEC, accept4, errno, recv, send, ssize_t,
)

# Argument checking is part of the specification: share it, so both
# implementations reject bad arguments identically before touching the fd.
from prefork._fastio_py import _byte_view, _fileno

__all__ = ["accept", "chargen", "discard", "echo", "sendall"]


cdef int _check_signals() except -1 with gil:
    PyErr_CheckSignals()
    return 0


cdef int _raise_oserror(int err) except -1 with gil:
    # OSError(errno, text) picks the subclass (ConnectionResetError, ...).
    raise OSError(err, os.strerror(err))


cdef ssize_t _recv_some(int fd, unsigned char *buf, size_t size) except -1 nogil:
    """One successful recv (0 means end of file); EINTR retried."""
    cdef ssize_t r
    cdef int err
    while True:
        r = recv(fd, buf, size, 0)
        if r >= 0:
            return r
        err = errno
        if err != EINTR:
            _raise_oserror(err)
        _check_signals()


cdef ssize_t _send_some(int fd, const unsigned char *buf, size_t size) except -1 nogil:
    """One successful send; EINTR retried; never raises SIGPIPE."""
    cdef ssize_t r
    cdef int err
    while True:
        r = send(fd, buf, size, MSG_NOSIGNAL)
        if r >= 0:
            return r
        err = errno
        if err != EINTR:
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
    cdef int fd = _fileno(listener)
    cdef int r = -1
    cdef int err = 0
    while True:
        with nogil:
            r = accept4(fd, NULL, NULL, SOCK_CLOEXEC)
            if r < 0:
                err = errno
        if r >= 0:
            return r
        if err == EINTR:
            PyErr_CheckSignals()
            continue
        if err == EAGAIN or err == EWOULDBLOCK or err == ECONNABORTED:
            return None
        _raise_oserror(err)


def echo(conn, buffer):
    """Echo everything read from ``conn`` back to it until end of file.

    See ``prefork._fastio_py.echo``.
    """
    cdef int fd = _fileno(conn)
    cdef unsigned char[::1] view = _byte_view(buffer, writable=True)
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
    cdef int fd = _fileno(conn)
    cdef unsigned char[::1] view = _byte_view(buffer, writable=True)
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
    cdef int fd = _fileno(conn)
    cdef const unsigned char[::1] view = _byte_view(pattern, writable=False)
    cdef const unsigned char *buf = &view[0]
    cdef size_t size = <size_t>view.shape[0]
    cdef size_t offset = 0
    cdef unsigned long long nout = 0
    cdef ssize_t r
    cdef int err = 0
    with nogil:
        while True:
            r = send(fd, buf + offset, size - offset, MSG_NOSIGNAL)
            if r >= 0:
                nout += <unsigned long long>r
                offset = (offset + <size_t>r) % size
                continue
            err = errno
            if err == EINTR:
                _check_signals()
                continue
            if err == EPIPE or err == ECONNRESET:
                break
            _raise_oserror(err)
    return 0, nout


def sendall(conn, data):
    """Send all of ``data`` (any bytes-like, may be empty); return its length.

    See ``prefork._fastio_py.sendall``.
    """
    cdef int fd = _fileno(conn)
    cdef const unsigned char[::1] view = memoryview(data).cast("B")
    cdef size_t size = <size_t>view.shape[0]
    cdef const unsigned char *buf = NULL
    cdef unsigned char empty = 0
    # A zero-length send still touches the descriptor, as socket.sendall does.
    buf = &view[0] if size > 0 else &empty
    with nogil:
        _send_all(fd, buf, size)
    return size
