/* rio: the guest side of bench/virtio.py's block figures (busybox has no fio, and its dd and
 * date print no sub-second times).  Built on the host with `gcc -static -O2` and handed to
 * the guest inside a read-only drive.
 *
 *   rio now                          CLOCK_MONOTONIC in seconds, 9 decimals (times a dd run)
 *   rio randr|randw DEV SECONDS SPAN_MIB
 *       4 KiB reads or writes at uniformly random 4 KiB-aligned offsets in the first SPAN_MIB
 *       MiB of DEV, O_DIRECT (no guest page cache), one request at a time (queue depth 1),
 *       for SECONDS; prints "ops <n> secs <elapsed>".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "now") == 0) {
        printf("%.9f\n", now());
        return 0;
    }
    if (argc != 5 || (strcmp(argv[1], "randr") != 0 && strcmp(argv[1], "randw") != 0)) {
        fprintf(stderr, "usage: rio now | rio randr|randw DEV SECONDS SPAN_MIB\n");
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
