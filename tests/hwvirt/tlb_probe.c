/* Make a Linux guest flush TLBs on another CPU, and count the TLB-shootdown IPIs it took.
 * Built static on the host by tests/hwvirt/test_nested_hyperv_linux.py.
 *
 *   tlb_probe ROUNDS
 *
 * A second thread spins on CPU 1 in this process's address space, so the memory map is live
 * there; the main thread, on CPU 0, maps a page, writes it and unmaps it ROUNDS times. Each
 * munmap must flush CPU 1's TLB for this mm (arch/x86/mm/tlb.c flush_tlb_mm_range ->
 * flush_tlb_multi): natively with an IPI, which CPU 1 counts in /proc/interrupts' "TLB" row
 * ("TLB shootdowns"); under Hyper-V's PV TLB flush (arch/x86/hyperv/mmu.c) with a hypercall
 * and no IPI. Prints the row's increase per CPU:
 *
 *   tlb_probe rounds=R tlb_ipis cpu0=+A cpu1=+B
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static atomic_int stop, running;
static volatile unsigned long sink;

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0) {
        perror("sched_setaffinity");
        exit(1);
    }
}

static void *spinner(void *arg) {
    (void)arg;
    pin(1);
    atomic_store(&running, 1);
    while (!atomic_load(&stop)) sink++;
    return NULL;
}

/* The "TLB:" row of /proc/interrupts: counts for CPU 0 and 1. */
static int tlb_row(long counts[2]) {
    FILE *f = fopen("/proc/interrupts", "r");
    char line[4096];
    if (!f) return -1;
    while (fgets(line, sizeof(line), f)) {
        char *p = line;
        while (*p == ' ') p++;
        if (strncmp(p, "TLB:", 4) == 0) {
            fclose(f);
            return sscanf(p + 4, "%ld %ld", &counts[0], &counts[1]) == 2 ? 0 : -1;
        }
    }
    fclose(f);
    return -1;
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 500;
    long before[2], after[2];
    pthread_t t;
    pin(0);
    if (pthread_create(&t, NULL, spinner, NULL) != 0) return 1;
    while (!atomic_load(&running)) sched_yield();
    if (tlb_row(before) != 0) {
        fprintf(stderr, "tlb_probe: no TLB row in /proc/interrupts\n");
        return 1;
    }
    for (int i = 0; i < rounds; i++) {
        volatile char *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (page == MAP_FAILED) return 1;
        page[0] = 1;
        munmap((void *)page, 4096);
    }
    if (tlb_row(after) != 0) return 1;
    atomic_store(&stop, 1);
    pthread_join(t, NULL);
    printf("tlb_probe rounds=%d tlb_ipis cpu0=+%ld cpu1=+%ld\n", rounds,
           after[0] - before[0], after[1] - before[1]);
    return 0;
}
