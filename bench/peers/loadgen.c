/* A closed-loop ping-pong load generator in C, so the client is never the
 * bottleneck a Python client would be.
 *
 *   loadgen HOST PORT CONNECTIONS SIZE SECONDS
 *
 * Each connection sends SIZE bytes, waits for all of them to come back,
 * checks them byte for byte, and repeats. Prints one line:
 *   messages=N seconds=S errors=E
 * and exits 1 if any echo was wrong, short or reset.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct conn { int fd; size_t got; };

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: loadgen HOST PORT CONNECTIONS SIZE SECONDS\n"); return 2; }
    int nconn = atoi(argv[3]);
    size_t size = (size_t)atol(argv[4]);
    double seconds = atof(argv[5]);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &sa.sin_addr);
    char *msg = malloc(size), *reply = malloc(size);
    for (size_t i = 0; i < size; i++) msg[i] = (char)(i * 31 + 7);
    int ep = epoll_create1(0), one = 1;
    struct conn *conns = calloc(nconn, sizeof *conns);
    for (int i = 0; i < nconn; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) { perror("connect"); return 1; }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conns[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    long messages = 0, errors = 0;
    double start = now(), deadline = start + seconds;
    for (int i = 0; i < nconn; i++) send(conns[i].fd, msg, size, MSG_NOSIGNAL);
    struct epoll_event events[256];
    while (now() < deadline) {
        int n = epoll_wait(ep, events, 256, 100);
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            ssize_t r = recv(c->fd, reply + c->got, size - c->got, 0);
            if (r <= 0) { errors++; epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); continue; }
            if (memcmp(reply + c->got, msg + c->got, (size_t)r) != 0) errors++;
            c->got += (size_t)r;
            if (c->got == size) {
                c->got = 0;
                messages++;
                if (send(c->fd, msg, size, MSG_NOSIGNAL) != (ssize_t)size) errors++;
            }
        }
    }
    printf("messages=%ld seconds=%.6f errors=%ld\n", messages, now() - start, errors);
    return errors ? 1 : 0;
}
