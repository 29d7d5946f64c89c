/* A tiny AF_VSOCK client/server for the guest (busybox has none); built static by
 * tests/hwvirt/test_net_vsock_linux.py and handed to the guest as a read-only drive.
 *
 *   vsock_probe serve PORT [N]  accept N connections (default 1) one after the other on one
 *                               listener, echo each back until EOF ("ECHOED <bytes>") or
 *                               an error ("CONNERR <strerror> after <bytes>": a snapshot
 *                               restore resets connections)
 *   vsock_probe send PORT N     connect to the host (CID 2) PORT, send N pattern bytes,
 *                               shut down writing, read until EOF; prints
 *                               "RECV <bytes> <fnv1a32 hex>"
 *
 * The pattern byte i is i % 251, the same as the test's.
 */
#include <errno.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what) {
    printf("ERROR %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

static int write_all(int fd, const unsigned char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Echo one connection until EOF (returns 0) or an error (-1, errno set). */
static int echo(int c, unsigned long *total) {
    static unsigned char buf[65536];
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            return 0;
        if (write_all(c, buf, (size_t)n) < 0)
            return -1;
        *total += (unsigned long)n;
    }
}

static int serve(unsigned port, unsigned count) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        die("socket");
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_port = port, .svm_cid = VMADDR_CID_ANY};
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("bind");
    if (listen(s, 1) < 0)
        die("listen");
    printf("LISTENING %u\n", port);
    fflush(stdout);
    for (unsigned i = 0; i < count; i++) {
        int c = accept(s, NULL, NULL);
        if (c < 0)
            die("accept");
        unsigned long total = 0;
        if (echo(c, &total) < 0)
            printf("CONNERR %s after %lu\n", strerror(errno), total);
        else
            printf("ECHOED %lu\n", total);
        fflush(stdout);
        close(c);
    }
    return 0;
}

static int send_recv(unsigned port, unsigned long count) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        die("socket");
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_port = port, .svm_cid = VMADDR_CID_HOST};
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("connect");
    static unsigned char buf[65536];
    unsigned long i = 0;
    while (i < count) {
        size_t n = 0;
        while (n < sizeof buf && i < count) {
            buf[n++] = (unsigned char)(i % 251);
            i++;
        }
        if (write_all(s, buf, n) < 0)
            die("write");
    }
    shutdown(s, SHUT_WR);
    unsigned long got = 0;
    unsigned int fnv = 2166136261u;
    for (;;) {
        ssize_t n = read(s, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("read");
        if (n == 0)
            break;
        for (ssize_t k = 0; k < n; k++) {
            fnv ^= buf[k];
            fnv *= 16777619u;
        }
        got += (unsigned long)n;
    }
    printf("RECV %lu %08x\n", got, fnv);
    fflush(stdout);
    close(s);
    return 0;
}

int main(int argc, char **argv) {
    if ((argc == 3 || argc == 4) && strcmp(argv[1], "serve") == 0)
        return serve((unsigned)strtoul(argv[2], NULL, 10),
                     argc == 4 ? (unsigned)strtoul(argv[3], NULL, 10) : 1);
    if (argc == 4 && strcmp(argv[1], "send") == 0)
        return send_recv((unsigned)strtoul(argv[2], NULL, 10), strtoul(argv[3], NULL, 10));
    fprintf(stderr, "usage: vsock_probe serve PORT [N] | send PORT N\n");
    return 2;
}
