/* vfio_probe: drives the devices tests/hwvirt/test_vfio_linux.py passes through to a kvmkit
 * guest (VFIO functions there) where the guest has no driver for them. Built static by the test.
 *
 * QEMU's edu device (docs/specs/edu.rst):
 *   vfio_probe BDF spin N            read the ID register N times (BAR0 is guest memory: no exits)
 *   vfio_probe BDF dma               copy 2 KiB into the device and back by DMA; compare
 *   vfio_probe BDF dma-out ADDR      DMA the device's buffer to guest-physical ADDR
 *   vfio_probe BDF msi VECTOR N      N factorial interrupts as MSI with vector VECTOR
 *   vfio_probe BDF intx N            N factorial interrupts as INTx, through uio_pci_generic
 *   vfio_probe BDF garbage SEED      nonsense to the config space and BAR0, then a last read
 * QEMU's pci-testdev (hw/misc/pci-testdev.c), through its I/O BAR (BAR1):
 *   vfio_probe BDF portio N          select the port test, read its name, write its counting
 *                                    port N times and read the count back
 * A virtio device with function-level reset (its driver unbound):
 *   vfio_probe BDF virtio-flr        set the device status, reset the function through sysfs
 *                                    (an FLR), read the status again (virtio 1.2 §2.1: 0 after
 *                                    a reset)
 *
 * The guest has no edu driver and no MSI-capable generic one, so MSI is programmed here
 * through the sysfs config file: address 0xFEE00000 (the LAPIC of CPU 0, fixed delivery),
 * data = VECTOR. Registers (edu.rst): 0x00 ID, 0x04 liveness, 0x08 factorial, 0x20 status
 * (0x01 computing, 0x80 interrupt when done), 0x24 interrupt status, 0x64 acknowledge,
 * 0x80/0x88/0x90/0x98 DMA source, destination, count, command (0x01 start, 0x02 to RAM);
 * the device's buffer is at 0x40000 (4 KiB).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BAR_SIZE (1 << 20)
#define EDU_BUF 0x40000
#define PAGE 4096
/* Bytes per DMA: under the device's 4 KiB buffer, because QEMU 7.2's edu aborts the whole
 * VM on a transfer that ends exactly at the buffer's end (its range check is off by one). */
#define DMA_LEN 2048

static const char *bdf;
static volatile uint32_t *bar;
static int cfg = -1;

static void die(const char *what) {
    printf("ERROR %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint32_t rd32(unsigned off) { return bar[off / 4]; }
static void wr32(unsigned off, uint32_t v) { bar[off / 4] = v; }
static void wr64(unsigned off, uint64_t v) { *(volatile uint64_t *)((char *)bar + off) = v; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Wait until (reg & mask) == 0, at most 20 s. */
static int wait_clear(unsigned off, uint32_t mask) {
    double end = now() + 20;
    while (rd32(off) & mask)
        if (now() > end)
            return -1;
    return 0;
}

static void open_config(void) {
    char path[256];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/config", bdf);
    cfg = open(path, O_RDWR);
    if (cfg < 0)
        die(path);
}

/* Map memory BAR `index` (its sysfs resource file); *size gets its length. */
static volatile uint8_t *map_bar(int index, size_t *size) {
    char path[256];
    struct stat st;
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/resource%d", bdf, index);
    int fd = open(path, O_RDWR | O_SYNC);
    if (fd < 0 || fstat(fd, &st) < 0)
        die(path);
    void *p = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        die("mmap resource");
    *size = st.st_size;
    return p;
}

/* The edu's BAR0. */
static void open_device(void) {
    size_t size;
    bar = (volatile uint32_t *)map_bar(0, &size);
    if (size < BAR_SIZE) {
        printf("ERROR BAR0 is %zu bytes\n", size);
        exit(1);
    }
}

static uint32_t cfg_read(unsigned off, unsigned len) {
    uint32_t v = 0;
    if (pread(cfg, &v, len, off) != (ssize_t)len)
        die("config read");
    return v;
}

static void cfg_write(unsigned off, unsigned len, uint32_t v) {
    if (pwrite(cfg, &v, len, off) != (ssize_t)len)
        die("config write");
}

static unsigned find_cap(uint8_t id) {
    unsigned off = cfg_read(0x34, 1) & 0xfc;
    for (int i = 0; i < 48 && off >= 0x40; i++) {
        if (cfg_read(off, 1) == id)
            return off;
        off = cfg_read(off + 1, 1) & 0xfc;
    }
    return 0;
}

/* Guest-physical address of a page of ours (root sees PFNs in /proc/self/pagemap). */
static uint64_t phys(void *va) {
    uint64_t entry;
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0)
        die("pagemap");
    if (pread(fd, &entry, 8, (uintptr_t)va / PAGE * 8) != 8)
        die("pagemap read");
    close(fd);
    if (!(entry >> 63) || !(entry & ((1ULL << 55) - 1))) {
        printf("ERROR page not present or PFN hidden\n");
        exit(1);
    }
    return (entry & ((1ULL << 55) - 1)) * PAGE + (uintptr_t)va % PAGE;
}

static void bus_master(void) { cfg_write(0x04, 2, cfg_read(0x04, 2) | 0x6); }

static int dma(uint64_t src, uint64_t dst, uint32_t cmd) {
    wr64(0x80, src);
    wr64(0x88, dst);
    wr64(0x90, DMA_LEN);
    wr64(0x98, cmd);
    return wait_clear(0x98, 1);
}

static int do_dma(void) {
    uint8_t *pages = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE | MAP_LOCKED, -1, 0);
    if (pages == MAP_FAILED)
        die("mmap pages");
    uint8_t *src = pages, *dst = pages + PAGE;
    for (int i = 0; i < PAGE; i++) {
        src[i] = (uint8_t)(i * 7 + 3);
        dst[i] = 0;
    }
    uint64_t psrc = phys(src), pdst = phys(dst);
    printf("DMA src %#llx dst %#llx\n", (unsigned long long)psrc, (unsigned long long)pdst);
    bus_master();
    if (dma(psrc, EDU_BUF, 1) || dma(EDU_BUF, pdst, 3)) {
        printf("DMA timeout\n");
        return 1;
    }
    for (int i = 0; i < DMA_LEN; i++)
        if (dst[i] != src[i]) {
            printf("DMA mismatch at %d: %#x != %#x\n", i, dst[i], src[i]);
            return 1;
        }
    printf("DMA ok %d\n", DMA_LEN);
    return 0;
}

static int do_dma_out(uint64_t addr) {
    bus_master();
    int rc = dma(EDU_BUF, addr, 3);
    printf("DMAOUT %#llx %s\n", (unsigned long long)addr, rc ? "timeout" : "done");
    return 0;
}

/* One factorial with the done-interrupt on; returns the result. The device clears its
 * computing bit before it raises the interrupt: wait for the interrupt status too. */
static uint32_t factorial(uint32_t n) {
    wr32(0x20, 0x80);
    wr32(0x08, n);
    if (wait_clear(0x20, 1))
        return 0;
    double end = now() + 20;
    while (!(rd32(0x24) & 1) && now() < end)
        ;
    return rd32(0x08);
}

static int do_msi(unsigned vector, int n) {
    unsigned cap = find_cap(0x05);
    if (!cap) {
        printf("MSI no capability\n");
        return 1;
    }
    uint16_t ctrl = cfg_read(cap + 2, 2);
    int is64 = ctrl & 0x80;
    cfg_write(cap + 4, 4, 0xfee00000);
    if (is64)
        cfg_write(cap + 8, 4, 0);
    cfg_write(cap + (is64 ? 12 : 8), 2, vector);
    cfg_write(cap + 2, 2, (ctrl & ~0x70) | 1);
    int ok = 0;
    for (int i = 0; i < n; i++) {
        uint32_t f = factorial(5);
        uint32_t status = rd32(0x24);
        wr32(0x64, status); /* edu.rst: acknowledge even with MSI */
        ok += f == 120 && (status & 1);
        usleep(20000);
    }
    cfg_write(cap + 2, 2, ctrl & ~0x71); /* MSI off: edu goes back to INTx */
    printf("MSI sent %d of %d cap %#x\n", ok, n, cap);
    return ok == n ? 0 : 1;
}

static int do_intx(int n) {
    char path[300];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/uio", bdf);
    DIR *dir = opendir(path);
    struct dirent *e = NULL;
    while (dir && (e = readdir(dir)) && strncmp(e->d_name, "uio", 3))
        ;
    if (!e) {
        printf("INTX no uio device\n");
        return 1;
    }
    snprintf(path, sizeof path, "/dev/%s", e->d_name);
    closedir(dir);
    int fd = open(path, O_RDWR);
    if (fd < 0)
        die(path);
    int got = 0;
    for (int i = 0; i < n; i++) {
        uint32_t count;
        /* uio_pci_generic masks INTx with the command register's Interrupt Disable bit in
         * its handler; userspace unmasks it there (Documentation/driver-api/uio-howto.rst). */
        cfg_write(0x04, 2, cfg_read(0x04, 2) & ~0x400);
        uint32_t f = factorial(5);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, 10000);
        if (r == 1 && read(fd, &count, 4) == 4 && f == 120)
            got++;
        wr32(0x64, rd32(0x24)); /* lower the line */
    }
    printf("INTX got %d of %d\n", got, n);
    return got == n ? 0 : 1;
}

static int do_spin(long n) {
    long ok = 0;
    for (long i = 0; i < n; i++)
        ok += rd32(0x00) == 0x010000ed;
    printf("SPIN %ld of %ld\n", ok, n);
    return ok == n ? 0 : 1;
}

static int do_garbage(unsigned seed) {
    srand(seed);
    /* Every configuration dword: all ones, then random values, byte/word/dword sized. */
    for (unsigned off = 0; off < 256; off += 4) {
        cfg_write(off, 4, 0xffffffff);
        cfg_write(off, 4, (uint32_t)rand());
        cfg_write(off + (rand() & 3), 1, (uint32_t)rand());
        cfg_write(off + (rand() & 2), 2, (uint32_t)rand());
    }
    printf("GARBAGE config done\n");
    /* The BAR's registers (the device may be unmapped now: reads give all ones). */
    int fd;
    char path[256];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/resource0", bdf);
    fd = open(path, O_RDWR | O_SYNC);
    if (fd < 0)
        die(path);
    for (int i = 0; i < 256; i++) {
        uint32_t off = (rand() % (BAR_SIZE / 4)) * 4;
        /* Not: a factorial of up to 2^32 (only takes time), interrupts with whatever message
         * the config writes left (an INIT to the guest's own CPU), a DMA anywhere (QEMU 7.2's
         * edu stops the whole lane on a range it dislikes). */
        if (off == 0x08 || off == 0x60 || off == 0x98)
            continue;
        if (pwrite(fd, &(uint32_t){(uint32_t)rand()}, 4, off) < 0 && errno != EIO)
            printf("GARBAGE pwrite %#x: %s\n", off, strerror(errno));
    }
    printf("GARBAGE bar done\n");
    return 0;
}

/* pci-testdev's I/O BAR (hw/misc/pci-testdev.c): byte 0 selects a test (0: the port
 * I/O test without an eventfd), the header reads back byte by byte (name from offset 16, the
 * port that counts at offset 4, the count at 12), and each byte written to that port with
 * the test's data value (0xFA) adds one. Accesses go through the sysfs resource file, i.e.
 * in/out instructions: port exits that kvmkit serves by VFIO region reads and writes. */
static int do_portio(int n) {
    char path[256], name[33] = {0};
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/resource1", bdf);
    int fd = open(path, O_RDWR);
    if (fd < 0)
        die(path);
    uint8_t zero = 0, data = 0xfa;
    uint32_t port = 0, count = 0;
    if (pwrite(fd, &zero, 1, 0) != 1)
        die("portio select");
    for (int i = 0; i < 32; i++) {
        if (pread(fd, &name[i], 1, 16 + i) != 1)
            die("portio name");
        if (!name[i])
            break;
    }
    if (pread(fd, &port, 4, 4) != 4)
        die("portio offset");
    for (int i = 0; i < n; i++)
        if (pwrite(fd, &data, 1, port) != 1)
            die("portio count");
    if (pread(fd, &count, 4, 12) != 4)
        die("portio read count");
    printf("PORTIO %s %u %u\n", name, port, count);
    return 0;
}

/* Function-level reset of a virtio device whose driver is unbound: ACKNOWLEDGE|DRIVER in the
 * device status of its common configuration (virtio 1.2 §4.1.4.3: the vendor capability with
 * cfg_type 1 names its BAR and offset; device_status is byte 20), then the kernel's reset of
 * the function (`reset` in sysfs, which uses FLR when the device offers it), then the status
 * again: a device reset clears it (§2.1). */
static int do_virtio_flr(void) {
    unsigned cap = cfg_read(0x34, 1) & 0xfc;
    for (int i = 0; i < 48 && cap >= 0x40; i++) {
        if (cfg_read(cap, 1) == 0x09 && cfg_read(cap + 3, 1) == 1)
            break;
        cap = cfg_read(cap + 1, 1) & 0xfc;
    }
    if (cap < 0x40) {
        printf("VIRTIOFLR no common configuration\n");
        return 1;
    }
    size_t size;
    volatile uint8_t *base = map_bar(cfg_read(cap + 4, 1), &size);
    uint32_t off = cfg_read(cap + 8, 4);
    if (off + 21 > size) {
        printf("VIRTIOFLR common configuration outside its BAR\n");
        return 1;
    }
    volatile uint8_t *status = base + off + 20;
    unsigned before = *status;
    *status = 1;
    *status = 3;
    unsigned set = *status;
    char path[256];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/reset", bdf);
    int fd = open(path, O_WRONLY);
    if (fd < 0 || write(fd, "1", 1) != 1)
        die(path);
    close(fd);
    printf("VIRTIOFLR %u %u %u\n", before, set, (unsigned)*status);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: vfio_probe BDF spin N|dma|dma-out A|msi V N|intx N|garbage S|"
                        "portio N|virtio-flr\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    bdf = argv[1];
    open_config();
    const char *cmd = argv[2];
    if (!strcmp(cmd, "portio") && argc > 3)
        return do_portio(atoi(argv[3]));
    if (!strcmp(cmd, "virtio-flr"))
        return do_virtio_flr();
    open_device();
    if (!strcmp(cmd, "spin") && argc > 3)
        return do_spin(atol(argv[3]));
    if (!strcmp(cmd, "dma"))
        return do_dma();
    if (!strcmp(cmd, "dma-out") && argc > 3)
        return do_dma_out(strtoull(argv[3], NULL, 0));
    if (!strcmp(cmd, "msi") && argc > 4)
        return do_msi(strtoul(argv[3], NULL, 0), atoi(argv[4]));
    if (!strcmp(cmd, "intx") && argc > 3)
        return do_intx(atoi(argv[3]));
    if (!strcmp(cmd, "garbage") && argc > 3)
        return do_garbage(strtoul(argv[3], NULL, 0));
    fprintf(stderr, "vfio_probe: bad command\n");
    return 2;
}
