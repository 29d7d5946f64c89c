/* A guest inside the guest: run in a `kvmkit run --nested` guest (L2), it creates a VM on
 * the guest's own /dev/kvm and runs real-mode code in it (L3) to port-I/O exits.
 * Built static by tests/hwvirt/test_nested_hyperv_linux.py and handed to the guest as a
 * read-only drive.
 *
 *   nested_probe quick             L3: mov $0x42,%al; out %al,$0x10; hlt
 *                                  prints "L3 out port=0x10 value=0x42" then "L3 hlt"
 *   nested_probe calibrate         how many spin iterations take about 0.5 s in L3
 *   nested_probe run PHASES LOOPS  L3 spins LOOPS iterations, reports each phase on port
 *                                  0x11 ("L3 phase N"), after PHASES phases outputs
 *                                  0x40 + PHASES on port 0x10 and halts ("L3 done ... ok")
 *
 * L3's parameters sit in its memory at 0x100 (LOOPS) and 0x104 (PHASES): the code is the
 * same in every mode. Exit status 0 when L3 did exactly what it should, 1 otherwise.
 * KVM API: Documentation/virt/kvm/api.rst (KVM_CREATE_VM, KVM_SET_USER_MEMORY_REGION,
 * KVM_CREATE_VCPU, KVM_GET/SET_SREGS, KVM_SET_REGS, KVM_RUN and struct kvm_run's io exit).
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE 0x10000
#define CODE 0x1000
#define PARAMS 0x100

/* 16-bit real-mode code of L3, assembled with the program (DS = 0: absolute addresses). */
extern const unsigned char l3_quick[], l3_quick_end[], l3_spin[], l3_spin_end[];
__asm__(
    ".pushsection .rodata\n"
    ".code16\n"
    "l3_quick:\n"
    "  mov $0x42, %al\n"
    "  out %al, $0x10\n"
    "  hlt\n"
    "l3_quick_end:\n"
    "l3_spin:\n"
    "  xor %bx, %bx\n"
    "1:\n"
    "  movl 0x100, %ecx\n"      /* LOOPS */
    "2:\n"
    "  dec %ecx\n"
    "  jnz 2b\n"
    "  inc %bx\n"
    "  mov %bx, %ax\n"
    "  out %al, $0x11\n"        /* phase report */
    "  cmpw 0x104, %bx\n"       /* PHASES */
    "  jne 1b\n"
    "  mov %bx, %ax\n"
    "  add $0x40, %ax\n"
    "  out %al, $0x10\n"        /* the result */
    "  hlt\n"
    "l3_spin_end:\n"
    ".code64\n"
    ".popsection\n");

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int die(const char *what) {
    perror(what);
    exit(1);
}

struct l3 {
    int vcpu;
    struct kvm_run *run;
    unsigned char *mem;
};

static void l3_create(struct l3 *g, const unsigned char *code, size_t len) {
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("open /dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    g->mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (g->mem == MAP_FAILED) die("mmap");
    memcpy(g->mem + CODE, code, len);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)g->mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    g->vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (g->vcpu < 0) die("KVM_CREATE_VCPU");
    int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (size < (int)sizeof(struct kvm_run)) die("KVM_GET_VCPU_MMAP_SIZE");
    g->run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, g->vcpu, 0);
    if (g->run == MAP_FAILED) die("mmap kvm_run");
    struct kvm_sregs sregs;
    if (ioctl(g->vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    if (ioctl(g->vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = CODE, .rflags = 0x2};
    if (ioctl(g->vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
}

/* Run L3 until it halts; print its port writes. Returns the value written to 0x10 (-1 if
 * none), counts the phase reports in *phases. */
static int l3_run(struct l3 *g, int *phases, int verbose) {
    int result = -1;
    *phases = 0;
    for (;;) {
        if (ioctl(g->vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        struct kvm_run *r = g->run;
        switch (r->exit_reason) {
        case KVM_EXIT_IO: {
            if (r->io.direction != KVM_EXIT_IO_OUT || r->io.size != 1) {
                fprintf(stderr, "L3 unexpected io port=%#x\n", r->io.port);
                return -1;
            }
            unsigned value = *((unsigned char *)r + r->io.data_offset);
            if (r->io.port == 0x11) {
                ++*phases;
                if (verbose) printf("L3 phase %u at %.3f\n", value, now());
                fflush(stdout);
            } else if (r->io.port == 0x10) {
                result = value;
                if (verbose) printf("L3 out port=0x10 value=%#x\n", value);
            } else {
                fprintf(stderr, "L3 unexpected port %#x\n", r->io.port);
                return -1;
            }
            break;
        }
        case KVM_EXIT_HLT:
            if (verbose) printf("L3 hlt\n");
            return result;
        default:
            fprintf(stderr, "L3 unexpected exit %u\n", r->exit_reason);
            return -1;
        }
    }
}

int main(int argc, char **argv) {
    struct l3 g;
    int phases;
    if (argc == 2 && !strcmp(argv[1], "quick")) {
        l3_create(&g, l3_quick, l3_quick_end - l3_quick);
        return l3_run(&g, &phases, 1) == 0x42 ? 0 : 1;
    }
    if (argc == 2 && !strcmp(argv[1], "calibrate")) {
        uint32_t loops = 1u << 20;
        for (;;) {
            l3_create(&g, l3_spin, l3_spin_end - l3_spin);
            memcpy(g.mem + PARAMS, &loops, 4);
            uint16_t one = 1;
            memcpy(g.mem + PARAMS + 4, &one, 2);
            double t0 = now();
            if (l3_run(&g, &phases, 0) != 0x41) return 1;
            double dt = now() - t0;
            if (dt > 0.1 || loops >= (1u << 30)) {
                double per_half_second = loops * 0.5 / dt;
                printf("%.0f\n", per_half_second < 1 ? 1 : per_half_second);
                return 0;
            }
            loops *= 4;
        }
    }
    if (argc == 4 && !strcmp(argv[1], "run")) {
        uint16_t want = (uint16_t)atoi(argv[2]);
        uint32_t loops = (uint32_t)strtoul(argv[3], NULL, 10);
        if (want == 0 || want > 0xbf || loops == 0) return 1;
        l3_create(&g, l3_spin, l3_spin_end - l3_spin);
        memcpy(g.mem + PARAMS, &loops, 4);
        memcpy(g.mem + PARAMS + 4, &want, 2);
        printf("L3 start phases=%u loops=%u at %.3f\n", want, loops, now());
        fflush(stdout);
        int value = l3_run(&g, &phases, 1);
        int ok = value == 0x40 + want && phases == want;
        printf("L3 done phases=%d value=%#x %s\n", phases, value, ok ? "ok" : "WRONG");
        return ok ? 0 : 1;
    }
    fprintf(stderr, "usage: %s quick | calibrate | run PHASES LOOPS\n", argv[0]);
    return 2;
}
