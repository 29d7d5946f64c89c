/* rio: the guest side of bench/virtio.py's block figures (busybox has no fio, and its dd and
 * date print no sub-second times).  Built on the host with `gcc -static -O2` and handed to
 * the guest inside a read-only drive.
 *
 *   rio now                          CLOCK_MONOTONIC in seconds, 9 decimals (times a dd run)
 *   rio randr|randw DEV SECONDS SPAN_MIB
 *       4 KiB reads or writes at uniformly random 4 KiB-aligned offsets in the first SPAN_MIB
 *       MiB of DEV, O_DIRECT (no guest page cache), one request at a time (queue depth 1),
 *       for SECONDS; prints "ops <n> secs <elapsed>".
 *
 * TCP, for the net figures (busybox nc moves data through a small buffer and times nothing):
 *   rio sink PORT            (host) accept one connection, read it to EOF, close
 *   rio source PORT MIB SECS (host) accept one connection, send MIB MiB (or stop after SECS
 *                            seconds), shut down the sending side, wait for the peer's EOF
 *   rio send ADDR PORT MIB SECS  (guest) the same after connecting
 *   rio recv ADDR PORT       (guest) connect, read to EOF, close
 * Each prints "bytes <n> secs <elapsed>", timed from the connection's start to the peer's EOF,
 * so data still in socket buffers is counted.  An alarm bounds every transfer (TCP_ALARM s).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* xorshift64: cheap and good enough to spread offsets; fixed seed, same sequence per VMM. */
static uint64_t next_random(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    return x;
}

#define TCP_ALARM 600
#define TCP_CHUNK (256 * 1024)

/* Send `total` bytes (if any), shut down our side, read until the peer's EOF. */
static int transfer(int fd, long long total, double seconds)
{
    static char buf[TCP_CHUNK];
    long long got = 0, sent = 0;
    memset(buf, 0x5a, sizeof buf);
    double start = now();
    /* Stopping at a time limit keeps a slow path from stretching the run: the figure is
     * bytes over time either way. */
    while (sent < total && !(seconds > 0 && now() - start >= seconds)) {
        size_t len = total - sent < TCP_CHUNK ? (size_t)(total - sent) : TCP_CHUNK;
        ssize_t n = write(fd, buf, len);
        if (n <= 0) {
            perror("rio: send");
            return 1;
        }
        sent += n;
    }
    shutdown(fd, SHUT_WR);
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0) {
            perror("rio: recv");
            return 1;
        }
        if (n == 0)
            break;
        got += n;
    }
    printf("bytes %lld secs %.6f\n", sent + got, now() - start);
    close(fd);
    return 0;
}

static int tcp(int argc, char **argv)
{
    alarm(TCP_ALARM); /* a stuck peer ends the run instead of the benchmark */
    int host = strcmp(argv[1], "sink") == 0 || strcmp(argv[1], "source") == 0;
    int sending = strcmp(argv[1], "source") == 0 || strcmp(argv[1], "send") == 0;
    int need = host ? (sending ? 5 : 3) : (sending ? 6 : 4);
    if (argc != need) {
        fprintf(stderr, "usage: rio sink PORT | source PORT MIB SECS | send ADDR PORT MIB SECS | "
                        "recv ADDR PORT\n");
        return 2;
    }
    long long total = sending ? atoll(argv[argc - 2]) << 20 : 0;
    double seconds = sending ? atof(argv[argc - 1]) : 0;
    struct sockaddr_in sa = {.sin_family = AF_INET};
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        perror("rio: socket");
        return 1;
    }
    if (host) {
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        sa.sin_port = htons((uint16_t)atoi(argv[2]));
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 1) != 0) {
            perror("rio: bind/listen");
            return 1;
        }
        printf("listening\n");
        fflush(stdout);
        int conn = accept(fd, NULL, NULL);
        if (conn < 0) {
            perror("rio: accept");
            return 1;
        }
        close(fd);
        fd = conn;
    } else {
        sa.sin_port = htons((uint16_t)atoi(argv[3]));
        if (inet_pton(AF_INET, argv[2], &sa.sin_addr) != 1 ||
            connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
            perror("rio: connect");
            return 1;
        }
    }
    return transfer(fd, total, seconds);
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "now") == 0) {
        printf("%.9f\n", now());
        return 0;
    }
    if (argc >= 2 && (strcmp(argv[1], "sink") == 0 || strcmp(argv[1], "source") == 0 ||
                      strcmp(argv[1], "send") == 0 || strcmp(argv[1], "recv") == 0))
        return tcp(argc, argv);
    if (argc != 5 || (strcmp(argv[1], "randr") != 0 && strcmp(argv[1], "randw") != 0)) {
        fprintf(stderr, "usage: rio now | rio randr|randw DEV SECONDS SPAN_MIB | "
                        "rio sink|source|send|recv ...\n");
        return 2;
    }
    int writing = argv[1][4] == 'w';
    double seconds = atof(argv[3]);
    uint64_t blocks = (uint64_t)atoll(argv[4]) * 256; /* 4 KiB blocks in SPAN_MIB */
    if (seconds <= 0 || blocks == 0) {
        fprintf(stderr, "rio: bad SECONDS or SPAN_MIB\n");
        return 2;
    }
    int fd = open(argv[2], (writing ? O_WRONLY : O_RDONLY) | O_DIRECT);
    if (fd < 0) {
        perror(argv[2]);
        return 1;
    }
    void *buf;
    /* O_DIRECT wants the buffer aligned to the logical block size; a page is always enough. */
    if (posix_memalign(&buf, 4096, 4096) != 0)
        return 1;
    memset(buf, 0xa5, 4096);
    uint64_t state = 0x9e3779b97f4a7c15ULL;
    uint64_t ops = 0;
    double start = now(), elapsed = 0;
    for (;;) {
        off_t off = (off_t)(next_random(&state) % blocks) * 4096;
        ssize_t n = writing ? pwrite(fd, buf, 4096, off) : pread(fd, buf, 4096, off);
        if (n != 4096) {
            perror("rio: I/O");
            return 1;
        }
        ops++;
        /* Reading the clock every 16 requests keeps its cost out of the figure. */
        if ((ops & 15) == 0 && (elapsed = now() - start) >= seconds)
            break;
    }
    printf("ops %llu secs %.6f\n", (unsigned long long)ops, elapsed);
    return 0;
}
