/* A minimal single-threaded epoll echo server: the physical-limit reference
 * for the event-driven servers.
 *
 *   epoll_echo PORT        listens on 127.0.0.1:PORT, prints "ready" when it does
 *
 * Level-triggered and non-blocking, one 256 KiB read buffer (prefork and
 * uvloop read as much at once). What the kernel
 * does not take at once is kept for that connection, which then waits for
 * EPOLLOUT and is not read until it is flushed (bounded: at most one read's
 * worth per connection), the same back-pressure the event worker applies.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF (256 * 1024)
#define MAXFD 65536

struct pending { char *data; size_t off, len; };
static struct pending pending[MAXFD];
static char buf[BUF];
static int ep;

static void watch(int fd, unsigned events, int op) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    epoll_ctl(ep, op, fd, &ev);
}

static void drop(int fd) {
    free(pending[fd].data);
    pending[fd] = (struct pending){0};
    close(fd);
}

/* Send data[off:len]; keep what is left. Returns -1 if the connection died. */
static int flush(int fd, const char *data, size_t off, size_t len) {
    while (off < len) {
        ssize_t w = send(fd, data + off, len - off, MSG_NOSIGNAL);
        if (w > 0) { off += w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) {
            struct pending *p = &pending[fd];
            if (p->data != data) {  /* first time: copy out of the shared buffer */
                p->data = malloc(len - off);
                memcpy(p->data, data + off, len - off);
                p->len = len - off;
                p->off = 0;
                watch(fd, EPOLLOUT, EPOLL_CTL_MOD);
            } else {
                p->off = off;
            }
            return 0;
        }
        return -1;
    }
    if (pending[fd].data == data) {  /* a kept remainder is flushed: read again */
        free(pending[fd].data);
        pending[fd] = (struct pending){0};
        watch(fd, EPOLLIN, EPOLL_CTL_MOD);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: epoll_echo PORT\n"); return 2; }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* Accepted connections inherit it: no reply's tail waits for a delayed ACK
     * (asyncio, uvloop and prefork set it too). */
    setsockopt(lfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) || listen(lfd, 2048)) { perror("bind"); return 1; }
    ep = epoll_create1(0);
    watch(lfd, EPOLLIN, EPOLL_CTL_ADD);
    struct epoll_event events[256];
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (c >= MAXFD) { close(c); continue; }
                    watch(c, EPOLLIN, EPOLL_CTL_ADD);
                }
                continue;
            }
            struct pending *p = &pending[fd];
            if (p->data) {  /* writable again */
                if (flush(fd, p->data, p->off, p->len) < 0) drop(fd);
                continue;
            }
            ssize_t r = recv(fd, buf, sizeof buf, 0);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0 || flush(fd, buf, 0, r) < 0) drop(fd);
        }
    }
}
