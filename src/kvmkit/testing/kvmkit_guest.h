/* kvmkit tiny-guest runtime: the guest side of the ucall channel.
 *
 * A guest reports to the host by writing the guest-physical address of a `struct ucall`
 * to port KVMKIT_UCALL_PORT (a 32-bit OUT). Guest memory is identity-mapped, so the address
 * of a local variable is its physical address. The host side is kvmkit/testing/ucall.py.
 */
#ifndef KVMKIT_GUEST_H
#define KVMKIT_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define KVMKIT_UCALL_PORT 0x1000
#define KVMKIT_REPORT32_PORT 0x1002

enum { UCALL_PRINT = 1, UCALL_REPORT = 2, UCALL_ASSERT = 3, UCALL_DONE = 4, UCALL_SYNC = 5 };

struct ucall {
	u32 cmd;
	u32 nargs;
	u32 line;
	u32 pad;
	u64 args[6];
	char file[64];
	char msg[128];
};

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void cpu_relax(void) { __asm__ volatile("pause"); }
static inline void halt(void) { __asm__ volatile("hlt"); }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }

void ucall(u32 cmd, u32 nargs, const u64 *args, const char *file, u32 line, const char *msg);
void guest_print(const char *msg);
void guest_report(u64 value);
void guest_report2(u64 a, u64 b);
void guest_sync(u64 stage);
void guest_done(u64 status);
void __guest_assert_fail(const char *file, u32 line, const char *expr, u64 a, u64 b);

#define GUEST_ASSERT(cond) \
	do { if (!(cond)) __guest_assert_fail(__FILE__, __LINE__, #cond, 0, 0); } while (0)
/* Reports both values on failure. */
#define GUEST_ASSERT_EQ(a, b) \
	do { u64 __a = (u64)(a), __b = (u64)(b); \
	     if (__a != __b) __guest_assert_fail(__FILE__, __LINE__, #a " == " #b, __a, __b); } while (0)

#endif
