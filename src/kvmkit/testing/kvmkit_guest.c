/* kvmkit tiny-guest runtime (see kvmkit_guest.h). Compiled into every C tiny guest. */
#include "kvmkit_guest.h"

static void copy_str(char *dst, const char *src, unsigned n)
{
	unsigned i = 0;
	if (src)
		for (; i + 1 < n && src[i]; i++)
			dst[i] = src[i];
	for (; i < n; i++)
		dst[i] = 0;
}

void ucall(u32 cmd, u32 nargs, const u64 *args, const char *file, u32 line, const char *msg)
{
	struct ucall uc;
	unsigned i;

	uc.cmd = cmd;
	uc.nargs = nargs > 6 ? 6 : nargs;
	uc.line = line;
	uc.pad = 0;
	for (i = 0; i < 6; i++)
		uc.args[i] = i < uc.nargs ? args[i] : 0;
	copy_str(uc.file, file, sizeof(uc.file));
	copy_str(uc.msg, msg, sizeof(uc.msg));
	/* The memory clobber makes the compiler store uc before the OUT. */
	__asm__ volatile("outl %0, %1" : : "a"((u32)(unsigned long)&uc), "Nd"((u16)KVMKIT_UCALL_PORT) : "memory");
}

void guest_print(const char *msg) { ucall(UCALL_PRINT, 0, 0, 0, 0, msg); }
void guest_report(u64 value) { ucall(UCALL_REPORT, 1, &value, 0, 0, 0); }
void guest_report2(u64 a, u64 b) { u64 v[2] = { a, b }; ucall(UCALL_REPORT, 2, v, 0, 0, 0); }
void guest_sync(u64 stage) { ucall(UCALL_SYNC, 1, &stage, 0, 0, 0); }

void guest_done(u64 status)
{
	for (;;)
		ucall(UCALL_DONE, 1, &status, 0, 0, 0);
}

void __guest_assert_fail(const char *file, u32 line, const char *expr, u64 a, u64 b)
{
	u64 v[2] = { a, b };
	for (;;)
		ucall(UCALL_ASSERT, 2, v, file, line, expr);
}
