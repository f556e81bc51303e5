# The libc calls the compiled hot loop makes, declared nogil so they can run
# with the GIL released (the uvloop includes/system.pxd habit).

cdef extern from "<errno.h>" nogil:
    int errno
    int EINTR
    int EAGAIN
    int EWOULDBLOCK
    int ECONNABORTED
    int EPROTO
    int EPIPE
    int ECONNRESET

cdef extern from "<sys/types.h>" nogil:
    ctypedef long ssize_t

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int accept4(int fd, sockaddr *addr, socklen_t *addrlen, int flags)
    int MSG_NOSIGNAL
    int SOCK_CLOEXEC
