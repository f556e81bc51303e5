/* A TLS ping-pong load generator in C (the one client bench/tls.py measures
 * every server with; prefork bench --tls is prefork's own): CONNS connections, each sending a SIZE-byte message
 * and waiting for its echo, again and again for SECONDS; one thread, epoll.
 *
 *   tls_pingpong HOST PORT CONNS SIZE SECONDS [--connect-per-request]
 *
 * Prints one JSON line: {"messages": N, "seconds": S, "handshakes": H,
 * "errors": E}. With --connect-per-request every message gets a new
 * connection and a full handshake (no session resumption): H/S is
 * handshakes per second. The server is not verified (the benchmark's own
 * certificate); TLS 1.3, OpenSSL's default suite (AES-GCM).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
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
#include <time.h>
#include <unistd.h>

struct client { int fd; SSL *ssl; int ready; size_t sent, got; };

static SSL_CTX *ctx;
static struct sockaddr_in addr;
static size_t size;
static char *message, *reply;
static int ep, per_request;
static long messages, handshakes, errors;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void watch(struct client *c, unsigned events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, op, c->fd, &ev);
}

static int start(struct client *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) return -1;
    c->ssl = SSL_new(ctx);
    SSL_set_fd(c->ssl, c->fd);
    SSL_set_connect_state(c->ssl);
    c->ready = 0;
    c->sent = c->got = 0;
    watch(c, EPOLLOUT, EPOLL_CTL_ADD);
    return 0;
}

static void stop(struct client *c) {
    SSL_free(c->ssl);
    close(c->fd);
    c->ssl = NULL;
}

/* Move one client on; -1 when it failed. */
static int step(struct client *c) {
    int r, e;
    if (!c->ready) {
        ERR_clear_error();
        r = SSL_do_handshake(c->ssl);
        if (r != 1) {
            e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ) { watch(c, EPOLLIN, EPOLL_CTL_MOD); return 0; }
            if (e == SSL_ERROR_WANT_WRITE) { watch(c, EPOLLOUT, EPOLL_CTL_MOD); return 0; }
            return -1;
        }
        c->ready = 1;
        handshakes++;
    }
    while (c->sent < size) {
        ERR_clear_error();
        r = SSL_write(c->ssl, message + c->sent, (int)(size - c->sent));
        if (r > 0) { c->sent += (size_t)r; continue; }
        e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_WRITE) { watch(c, EPOLLOUT, EPOLL_CTL_MOD); return 0; }
        if (e == SSL_ERROR_WANT_READ) break;
        return -1;
    }
    for (;;) {
        ERR_clear_error();
        r = SSL_read(c->ssl, reply, (int)(size - c->got));
        if (r > 0) {
            c->got += (size_t)r;
            if (c->got == size) break;
            continue;
        }
        e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ) { watch(c, EPOLLIN, EPOLL_CTL_MOD); return 0; }
        return -1;
    }
    messages++;
    if (per_request) {
        SSL_shutdown(c->ssl);
        stop(c);
        return start(c);
    }
    c->sent = c->got = 0;
    return step(c);
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: tls_pingpong HOST PORT CONNS SIZE SECONDS [--connect-per-request]\n");
        return 2;
    }
    int conns = atoi(argv[3]);
    signal(SIGPIPE, SIG_IGN);  /* EPIPE from write(2), not death */
    double seconds = atof(argv[5]);
    size = (size_t)atol(argv[4]);
    per_request = argc > 6 && strcmp(argv[6], "--connect-per-request") == 0;
    addr.sin_family = AF_INET;
    addr.sin_port = htons(atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &addr.sin_addr);
    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET | SSL_OP_IGNORE_UNEXPECTED_EOF);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    message = malloc(size);
    reply = malloc(size);
    memset(message, 'x', size);
    ep = epoll_create1(0);
    struct client *clients = calloc((size_t)conns, sizeof *clients);
    for (int i = 0; i < conns; i++)
        if (start(&clients[i]) < 0) { perror("connect"); return 1; }
    struct epoll_event events[256];
    double began = now(), end = began + seconds;
    while (now() < end) {
        int n = epoll_wait(ep, events, 256, 100);
        for (int i = 0; i < n; i++) {
            struct client *c = events[i].data.ptr;
            if (step(c) < 0) {
                errors++;
                stop(c);
                if (start(c) < 0) return 1;
            }
        }
    }
    printf("{\"messages\": %ld, \"seconds\": %.6f, \"handshakes\": %ld, \"errors\": %ld}\n",
           messages, now() - began, handshakes, errors);
    return 0;
}
