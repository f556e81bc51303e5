/* A minimal single-threaded epoll echo server over TLS: the physical-limit
 * reference for prefork's TLS (OpenSSL on the socket, as the event worker's
 * compiled loop drives it).
 *
 *   tls_epoll_echo PORT CERT KEY     listens on 127.0.0.1:PORT, prints "ready"
 *
 * The state machine prefork's loop has: the handshake by WANT_READ/WANT_WRITE,
 * SSL_read until WANT_READ (decrypted bytes OpenSSL holds drained before
 * waiting again), partial writes with a moving buffer, what OpenSSL did not
 * take kept for that connection (not read again until it is flushed), a
 * close_notify sent and not awaited. Same OpenSSL defaults as prefork's
 * context: TLS 1.2 at least, OpenSSL's suites, renegotiation off, an end of
 * file without close_notify taken as the end.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536
#define MAXFD 65536

struct conn { SSL *ssl; int ready; char *data; size_t off, len; };
static struct conn conns[MAXFD];
static char buf[BUF];
static int ep;

static void watch(int fd, unsigned events, int op) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    epoll_ctl(ep, op, fd, &ev);
}

static void drop(int fd, int clean) {
    struct conn *c = &conns[fd];
    if (c->ssl) {
        ERR_clear_error();
        if (clean && c->ready) SSL_shutdown(c->ssl);  /* close_notify, not awaited */
        SSL_free(c->ssl);
    }
    free(c->data);
    *c = (struct conn){0};
    close(fd);
}

/* Write data[off:len] through TLS; keep what is left. -1: the connection died. */
static int flush(int fd, const char *data, size_t off, size_t len) {
    struct conn *c = &conns[fd];
    while (off < len) {
        ERR_clear_error();
        int w = SSL_write(c->ssl, data + off, (int)(len - off));
        if (w > 0) { off += (size_t)w; continue; }
        int e = SSL_get_error(c->ssl, w);
        if (e != SSL_ERROR_WANT_WRITE && e != SSL_ERROR_WANT_READ) return -1;
        if (c->data != data) {  /* first time: copy out of the shared buffer */
            c->data = malloc(len - off);
            memcpy(c->data, data + off, len - off);
            c->len = len - off;
            c->off = 0;
            watch(fd, e == SSL_ERROR_WANT_WRITE ? EPOLLOUT : EPOLLIN, EPOLL_CTL_MOD);
        } else {
            c->off = off;
        }
        return 0;
    }
    if (c->data == data) {  /* a kept remainder is flushed: read again */
        free(c->data);
        c->data = NULL;
        c->off = c->len = 0;
        watch(fd, EPOLLIN, EPOLL_CTL_MOD);
    }
    return 0;
}

static void serve(int fd) {
    struct conn *c = &conns[fd];
    if (!c->ready) {
        ERR_clear_error();
        int r = SSL_do_handshake(c->ssl);
        if (r == 1) { c->ready = 1; watch(fd, EPOLLIN, EPOLL_CTL_MOD); }
        else {
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ) watch(fd, EPOLLIN, EPOLL_CTL_MOD);
            else if (e == SSL_ERROR_WANT_WRITE) watch(fd, EPOLLOUT, EPOLL_CTL_MOD);
            else { drop(fd, 0); return; }
            return;
        }
    }
    if (c->data) {  /* writable again */
        if (flush(fd, c->data, c->off, c->len) < 0) { drop(fd, 0); return; }
        if (c->data) return;
    }
    for (;;) {  /* until WANT_READ: OpenSSL may hold a record epoll cannot see */
        ERR_clear_error();
        int r = SSL_read(c->ssl, buf, sizeof buf);
        if (r > 0) {
            if (flush(fd, buf, 0, (size_t)r) < 0) { drop(fd, 0); return; }
            if (c->data) return;  /* wait for the peer to read first */
            continue;
        }
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ) return;
        drop(fd, e == SSL_ERROR_ZERO_RETURN);
        return;
    }
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: tls_epoll_echo PORT CERT KEY\n"); return 2; }
    /* OpenSSL writes with write(2): a peer gone mid-write must be EPIPE,
     * not a SIGPIPE that kills the process (Python ignores it: prefork). */
    signal(SIGPIPE, SIG_IGN);
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
                              | SSL_MODE_RELEASE_BUFFERS);
    if (SSL_CTX_use_certificate_chain_file(ctx, argv[2]) != 1
        || SSL_CTX_use_PrivateKey_file(ctx, argv[3], SSL_FILETYPE_PEM) != 1) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
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
                    int on = 1;  /* TLS writes are several records: no Nagle wait */
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
                    conns[c].ssl = SSL_new(ctx);
                    SSL_set_fd(conns[c].ssl, c);
                    SSL_set_accept_state(conns[c].ssl);
                    watch(c, EPOLLIN, EPOLL_CTL_ADD);
                }
                continue;
            }
            serve(fd);
        }
    }
}
