# The libc calls the compiled modules make (the hot loop, prefork/_fastio.pyx,
# and the load generator, prefork/_loadgen.pyx), declared nogil so that they
# run with the GIL released; one extern block per header (the uvloop
# includes/system.pxd habit), fixed-width integers from libc.stdint.
#
# Rule: cimport this module under a name, ``from prefork cimport _posix as
# posix``, so that every call reads ``posix.recv(...)`` and no C name
# shadows a Python one (``socket``, ``time``, ``close``...).

from libc.stdint cimport uint32_t, uint64_t

cdef extern from "<errno.h>" nogil:
    int errno
    int EAGAIN
    int EWOULDBLOCK
    int EINTR
    int EINPROGRESS
    int ECONNABORTED
    int ECONNRESET
    int EPIPE
    int EPROTO
    int EMFILE
    int ENFILE
    int ENOBUFS
    int ENOMEM

cdef extern from "<fcntl.h>" nogil:
    int F_GETFL
    int O_NONBLOCK
    int fcntl(int fd, int cmd, ...)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t readv(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    ctypedef unsigned short sa_family_t
    struct sockaddr_storage:
        sa_family_t ss_family
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr *addr, socklen_t addrlen)
    int accept4(int fd, sockaddr *addr, socklen_t *addrlen, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    # The last argument is a struct timespec *; prefork always passes NULL.
    int recvmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags, void *timeout)
    int sendmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags)
    int getsockopt(int fd, int level, int name, void *value, socklen_t *length)
    int setsockopt(int fd, int level, int name, const void *value, socklen_t length)
    int shutdown(int fd, int how)
    int SHUT_WR
    int AF_UNIX
    int AF_INET
    int AF_INET6
    int SOCK_STREAM
    int SOCK_DGRAM
    int SOCK_CLOEXEC
    int SOCK_NONBLOCK
    int SOL_SOCKET
    int SO_ERROR
    int MSG_DONTWAIT
    int MSG_NOSIGNAL
    int MSG_TRUNC

cdef extern from "<netinet/in.h>" nogil:
    int IPPROTO_TCP
    struct in_addr:
        pass
    struct in6_addr:
        pass
    struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        in6_addr sin6_addr
    unsigned short ntohs(unsigned short n)

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

cdef extern from "<netinet/tcp.h>" nogil:
    int TCP_NODELAY

cdef extern from "<sys/epoll.h>" nogil:
    union epoll_data:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    ctypedef epoll_data epoll_data_t
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    int EPOLLIN
    int EPOLLOUT
    int EPOLLERR
    int EPOLLHUP
    int EPOLLEXCLUSIVE
    int EPOLL_CTL_ADD
    int EPOLL_CTL_MOD
    int EPOLL_CTL_DEL
    int EPOLL_CLOEXEC

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    struct tm:
        pass
    int CLOCK_MONOTONIC
    int CLOCK_REALTIME
    int clock_gettime(int clk_id, timespec *tp)
    time_t time(time_t *t)
    tm *gmtime_r(const time_t *timep, tm *result)
    size_t strftime(char *s, size_t maxsize, const char *fmt, const tm *t)

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
