/* A minimal blocking prefork echo server: the physical-limit reference for
 * the process-per-connection servers (prefork's sync worker, the tutorial
 * prefork). The master binds and listens, forks WORKERS children and waits;
 * each child accepts one connection at a time and echoes it with blocking
 * recv/send until the client closes.
 *
 *   blocking_prefork PORT WORKERS     prints "ready" once the children exist
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static void serve(int lfd) {
    static char buf[65536];
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    for (;;) {
        int c = accept(lfd, NULL, NULL);
        if (c < 0) continue;
        for (;;) {
            ssize_t r = recv(c, buf, sizeof buf, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            ssize_t off = 0;
            while (off < r) {
                ssize_t w = send(c, buf + off, r - off, MSG_NOSIGNAL);
                if (w < 0 && errno == EINTR) continue;
                if (w < 0) break;
                off += w;
            }
            if (off < r) break;
        }
        close(c);
    }
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: blocking_prefork PORT WORKERS\n"); return 2; }
    int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1, workers = atoi(argv[2]);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* Accepted connections inherit it: no reply's tail waits for a delayed ACK
     * (asyncio, uvloop and prefork set it too). */
    setsockopt(lfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) || listen(lfd, 2048)) { perror("bind"); return 1; }
    for (int i = 0; i < workers; i++)
        if (fork() == 0) serve(lfd);
    printf("ready\n");
    fflush(stdout);
    while (wait(NULL) > 0 || errno == EINTR) {}
    return 0;
}
