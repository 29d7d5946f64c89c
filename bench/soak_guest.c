/* The soak's tiny guest (bench/soak.py): a PVH "kernel" that drives a virtio-blk and a
 * virtio-vsock device over virtio-mmio and keeps traffic going on both, forever.
 *
 * Entered through the PVH note (Xen's docs/misc/pvh.pandoc) in 32-bit protected mode, CPL0,
 * paging off, EBX = hvm_start_info. On a PVM host CPL0 code runs in KVM's instruction
 * emulator (slow) and CPL3 code natively, so the start-up code only builds an identity map
 * (4 GiB, 2 MiB pages, user-accessible), enters 64-bit long mode, sets up the IDT, a TSS
 * (RSP0, an I/O bitmap allowing every port) and the LAPIC timer, and drops to CPL3, where
 * the drivers run. To wait, the CPL3 code executes `ud2`, whose CPL0 #UD handler does
 * `sti; hlt` until the next interrupt (the periodic LAPIC timer, SOAK_TICK_MS): an idle
 * guest costs a timer interrupt per tick, not a spinning vCPU.
 *
 * Each round: write one sector with a pattern of the round number, read it back and check
 * it (virtio 1.2 §5.2.6); send 64 bytes on a vsock stream connection to host port 5000 and
 * check that the host echoes them (§5.10.6). A vsock transport reset (after a snapshot
 * restore, §5.10.6.6), a RST, or no answer within a timeout drops the connection; the
 * next round connects again. Progress on the serial port: '.' for a round whose echo came,
 * 'x' for one without; a failure prints "FAIL <what>" and the guest stops (the soak reads
 * the console).
 *
 * Devices are found from the kernel command line's virtio_mmio.device=<size>@<addr>:<irq>.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define SOAK_TICK_MS 20
#define VSOCK_PORT 5000
#define LAPIC 0xFEE00000ull
#define TIMER_VECTOR 32
#define IDLE_VECTOR 6                /* #UD: see idle_isr */
#define PML4 0x10000                /* page tables: PML4, PDPT, 4 page directories */
#define TSS 0x30000                 /* above the command line kvmkit puts at 0x20000 */
#define KSTACK 0x9F000
#define USTACK 0x8F000

__asm__(
	"	.section .note.Xen, \"\", @note\n"
	"	.balign 4\n"
	"	.long 4, 4, 18\n"          /* XEN_ELFNOTE_PHYS32_ENTRY */
	"	.asciz \"Xen\"\n"
	"	.long _start\n"
	"	.text\n"
	"	.code32\n"
	"	.globl _start\n"
	"_start:\n"
	"	cli\n"
	"	cld\n"
	"	movl %ebx, start_info\n"
	/* identity map of 4 GiB with 2 MiB pages, P|RW|US (|PS) (SDM vol. 3A 4.5) */
	"	movl $0x10000, %edi\n"
	"	xorl %eax, %eax\n"
	"	movl $0x1800, %ecx\n"
	"	rep stosl\n"
	"	movl $0x11007, 0x10000\n"
	"	movl $0x12007, 0x11000\n"
	"	movl $0x13007, 0x11008\n"
	"	movl $0x14007, 0x11010\n"
	"	movl $0x15007, 0x11018\n"
	"	movl $0x12000, %edi\n"
	"	movl $0x87, %eax\n"
	"	movl $2048, %ecx\n"
	"1:	movl %eax, (%edi)\n"
	"	addl $0x200000, %eax\n"
	"	addl $8, %edi\n"
	"	decl %ecx\n"
	"	jnz 1b\n"
	/* long mode: PAE, CR3, EFER.LME, then paging (SDM vol. 3A 10.8.5) */
	"	movl %cr4, %eax\n"
	"	orl $0x20, %eax\n"
	"	movl %eax, %cr4\n"
	"	movl $0x10000, %eax\n"
	"	movl %eax, %cr3\n"
	"	movl $0xC0000080, %ecx\n"
	"	rdmsr\n"
	"	orl $0x100, %eax\n"
	"	wrmsr\n"
	"	movl %cr0, %eax\n"
	"	orl $0x80000001, %eax\n"
	"	movl %eax, %cr0\n"
	"	lgdt gdtr\n"
	"	ljmp $0x08, $start64\n"
	"	.code64\n"
	"start64:\n"
	"	movw $0x10, %ax\n"
	"	movw %ax, %ds\n"
	"	movw %ax, %es\n"
	"	movw %ax, %ss\n"
	"	movw %ax, %fs\n"
	"	movw %ax, %gs\n"
	"	movq $0x9F000, %rsp\n"
	"	call kmain\n"
	"2:	hlt\n"
	"	jmp 2b\n"
	"	.balign 8\n"
	/* null, kernel code64, kernel data, user data, user code64, TSS (16 bytes) */
	"	.globl gdt\n"
	"gdt:	.quad 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CFF2000000FFFF\n"
	"	.quad 0x00AFFA000000FFFF, 0, 0\n"
	"gdtr:	.word 55\n"
	"	.long gdt\n"
	/* the timer: count the tick, EOI (disp32 would sign-extend 0xFEE000B0: a register) */
	"	.globl timer_isr\n"
	"timer_isr:\n"
	"	incl ticks(%rip)\n"
	"	pushq %rax\n"
	"	movl $0xFEE000B0, %eax\n"
	"	movl $0, (%rax)\n"
	"	popq %rax\n"
	"	iretq\n"
	"	.globl other_isr\n"
	"other_isr:\n"
	"	pushq %rax\n"
	"	movl $0xFEE000B0, %eax\n"
	"	movl $0, (%rax)\n"
	"	popq %rax\n"
	"	iretq\n"
	/* ud2 at CPL3 (#UD, vector 6): the guest's "sleep until the next interrupt". Not
	 * `int n`: on a PVM host a software interrupt from CPL3 does not reach its gate (it
	 * arrives as an exception at the int instruction), while exceptions do; any other
	 * #UD is a fault. */
	"	.globl idle_isr\n"
	"idle_isr:\n"
	"	pushq %rax\n"
	"	movq 8(%rsp), %rax\n"
	"	cmpw $0x0b0f, (%rax)\n"
	"	popq %rax\n"
	"	jne fault_isr\n"
	"	sti\n"
	"	hlt\n"
	"	cli\n"
	"	addq $2, (%rsp)\n"
	"	iretq\n"
	/* an exception: say where, and stop (the stack: [error code,] RIP, CS) */
	"	.globl fault_isr\n"
	"fault_isr:\n"
	"	movq %rsp, %rdi\n"
	"	call fault\n"
	"3:	hlt\n"
	"	jmp 3b\n"
	"	.globl enter_user\n"
	"enter_user:\n"              /* (rip) -> iretq to CPL3, IOPL 3, IF clear */
	"	pushq $0x1B\n"
	"	pushq $0x8F000\n"
	"	pushq $0x3002\n"
	"	pushq $0x23\n"
	"	pushq %rdi\n"
	"	iretq\n");

volatile u32 ticks;
u32 start_info;
extern char timer_isr[], other_isr[], idle_isr[], fault_isr[];
extern u64 gdt[];
extern void enter_user(void (*fn)(void)) __attribute__((noreturn));
static u64 idt[512];

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void w32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u32 r32(u64 addr) { return *(volatile u32 *)addr; }
/* CPL3's way to wait: the CPL0 handler of #UD halts until the next interrupt (idle_isr) */
static inline void idle(void) { __asm__ volatile("ud2" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static void print(const char *s) { while (*s) outb(0x3f8, (u8)*s++); }

static void print_hex(u32 v)
{
	for (int i = 28; i >= 0; i -= 4)
		outb(0x3f8, "0123456789abcdef"[(v >> i) & 15]);
}

void fault(const u64 *frame)
{
	print("FAIL exception, stack");
	for (int i = 0; i < 4; i++) {
		outb(0x3f8, ' ');
		print_hex((u32)frame[i]);
	}
	print("\n");
}

static void fail(const char *what)
{
	print("FAIL ");
	print(what);
	print("\n");
	for (;;)
		idle();
}

/* rep stosl / repe scasl: one emulated instruction each, not a loop of them */
static void fill(void *p, u32 dwords, u32 v)
{
	__asm__ volatile("rep stosl" : "+D"(p), "+c"(dwords) : "a"(v) : "memory");
}

static int all(const void *p, u32 dwords, u32 v)
{
	u8 eq;
	__asm__ volatile("cld; repe scasl; sete %0" : "=r"(eq), "+D"(p), "+c"(dwords) : "a"(v)
			 : "memory", "cc");
	return eq;
}

static void sleep_ticks(u32 n)
{
	u32 until = ticks + n;
	while ((int)(until - ticks) > 0)
		idle();
}

/* -- virtio-mmio (§4.2.2) and split virtqueues (§2.7) */
struct vq { u64 dev, desc, avail, used; u32 q, size, next, seen; };
static u64 area = 0x200000; /* rings and buffers: zeroed pages from 2 MiB */

static u64 page(void)
{
	u64 p = area;
	area += 0x1000;
	fill((void *)p, 1024, 0);
	return p;
}

static void dev_init(u64 dev, u32 nq, struct vq *qs)
{
	w32(dev + 0x70, 0);
	w32(dev + 0x70, 3);                     /* ACKNOWLEDGE | DRIVER */
	w32(dev + 0x24, 1);
	w32(dev + 0x20, 1);                     /* VIRTIO_F_VERSION_1 only */
	w32(dev + 0x24, 0);
	w32(dev + 0x20, 0);
	w32(dev + 0x70, 11);                    /* FEATURES_OK */
	if (!(r32(dev + 0x70) & 8))
		fail("features");
	for (u32 q = 0; q < nq; q++) {
		struct vq *v = &qs[q];
		v->dev = dev; v->q = q; v->size = 16; v->next = 0; v->seen = 0;
		v->desc = page(); v->avail = page(); v->used = page();
		w32(dev + 0x30, q);
		w32(dev + 0x38, v->size);
		w32(dev + 0x80, (u32)v->desc); w32(dev + 0x84, 0);
		w32(dev + 0x90, (u32)v->avail); w32(dev + 0x94, 0);
		w32(dev + 0xa0, (u32)v->used); w32(dev + 0xa4, 0);
		w32(dev + 0x44, 1);
	}
	w32(dev + 0x70, 15);                    /* DRIVER_OK */
}

static void vq_add(struct vq *v, int n, const u64 *addr, const u32 *len, const int *wr)
{
	u32 head = v->next;
	for (int i = 0; i < n; i++) {
		u32 d = (head + i) % v->size;
		volatile u32 *p = (volatile u32 *)(v->desc + 16 * d);
		p[0] = (u32)addr[i]; p[1] = (u32)(addr[i] >> 32); p[2] = len[i];
		p[3] = ((i + 1 < n ? 1u : 0u) | (wr[i] ? 2u : 0u)) | (((d + 1) % v->size) << 16);
	}
	v->next = (head + n) % v->size;
	volatile u16 *idx = (volatile u16 *)(v->avail + 2);
	*(volatile u16 *)(v->avail + 4 + 2 * (*idx % v->size)) = (u16)head;
	barrier();
	*idx = (u16)(*idx + 1);
	w32(v->dev + 0x50, v->q);               /* QueueNotify: a KVM ioeventfd */
}

static int vq_has(struct vq *v) { return *(volatile u16 *)(v->used + 2) != (u16)v->seen; }

/* the next used entry: its descriptor head and length */
static void vq_get(struct vq *v, u32 *head, u32 *len)
{
	volatile u32 *e = (volatile u32 *)(v->used + 4 + 8 * (v->seen % v->size));
	*head = e[0];
	*len = e[1];
	v->seen++;
}

static int vq_wait(struct vq *v, u32 timeout_ticks)
{
	u32 until = ticks + timeout_ticks;
	while (!vq_has(v)) {
		if ((int)(until - ticks) <= 0)
			return 0;
		idle();
	}
	return 1;
}

/* -- virtio-blk (§5.2.6) */
static struct vq blk;
static u64 blk_hdr, blk_data, blk_status;
static u64 blk_sectors;

static u8 blk_req(u32 type, u64 sector)
{
	volatile u32 *h = (volatile u32 *)blk_hdr;
	h[0] = type; h[1] = 0; h[2] = (u32)sector; h[3] = (u32)(sector >> 32);
	*(volatile u8 *)blk_status = 0xff;
	u64 a[3] = {blk_hdr, blk_data, blk_status};
	u32 l[3] = {16, 512, 1};
	int w[3] = {0, type == 0, 1};
	vq_add(&blk, 3, a, l, w);
	if (!vq_wait(&blk, 30000 / SOAK_TICK_MS))
		fail("blk timeout");
	u32 head, len;
	vq_get(&blk, &head, &len);
	return *(volatile u8 *)blk_status;
}

/* -- virtio-vsock (§5.10.6): one stream connection to the host */
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
struct __attribute__((packed)) vhdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
};
#define RXBUFS 8
#define RXBUF 4096
static struct vq vs[3];
static u64 cid;
static u64 rxbuf[RXBUFS], evbuf, txbuf;
static u32 local_port = 1024, connected, fwd_cnt, echoed;

static void post_rx(u64 buf)
{
	u64 a[1] = {buf};
	u32 l[1] = {RXBUF};
	int w[1] = {1};
	vq_add(&vs[0], 1, a, l, w);
}

static void post_event(void)
{
	u64 a[1] = {evbuf};
	u32 l[1] = {4};
	int w[1] = {1};
	vq_add(&vs[2], 1, a, l, w);
}

static void vsend(u16 op, u32 len)
{
	struct vhdr *h = (struct vhdr *)txbuf;
	h->src_cid = cid; h->dst_cid = 2;
	h->src_port = local_port; h->dst_port = VSOCK_PORT;
	h->len = len; h->type = 1; h->op = op; h->flags = op == OP_SHUTDOWN ? 3 : 0;
	h->buf_alloc = 65536; h->fwd_cnt = fwd_cnt;
	u64 a[1] = {txbuf};
	u32 l[1] = {sizeof(struct vhdr) + len};
	int w[1] = {0};
	vq_add(&vs[1], 1, a, l, w);
	if (!vq_wait(&vs[1], 30000 / SOAK_TICK_MS))
		fail("vsock tx timeout");
	u32 head, used;
	vq_get(&vs[1], &head, &used);
}

/* handle what came in: the reset event, the connection's answers, echoed data (checked
 * against `pattern`); every rx buffer goes back to the device */
static void vsock_poll(u32 pattern)
{
	u32 head, len;
	while (vq_has(&vs[2])) {                /* TRANSPORT_RESET: the connection is gone */
		vq_get(&vs[2], &head, &len);
		connected = 0;
		post_event();
	}
	while (vq_has(&vs[0])) {
		vq_get(&vs[0], &head, &len);
		u64 buf = 0;
		for (int i = 0; i < RXBUFS; i++)
			if (rxbuf[i] == *(volatile u64 *)(vs[0].desc + 16 * head))
				buf = rxbuf[i];
		if (!buf)
			fail("vsock rx descriptor");
		struct vhdr *h = (struct vhdr *)buf;
		if (h->dst_port == local_port) {
			if (h->op == OP_RESPONSE)
				connected = 1;
			else if (h->op == OP_RST || h->op == OP_SHUTDOWN)
				connected = 0;
			else if (h->op == OP_RW && connected) {
				/* the echo may come back split anywhere: check byte by byte
				 * against the pattern's byte at that offset of the stream */
				const u8 *d = (const u8 *)(buf + sizeof(*h));
				for (u32 i = 0; i < h->len; i++)
					if (echoed + i >= 64 || d[i] != (u8)(pattern >> 8 * ((echoed + i) % 4)))
						fail("vsock echo data");
				fwd_cnt += h->len;
				echoed += h->len;
			}
		}
		post_rx(buf);
	}
}

static int vsock_round(u32 pattern)
{
	vsock_poll(pattern);
	if (!connected) {
		local_port++;
		fwd_cnt = 0;
		vsend(OP_REQUEST, 0);
		u32 until = ticks + 5000 / SOAK_TICK_MS;
		while (!connected && (int)(until - ticks) > 0) {
			idle();
			vsock_poll(pattern);
		}
		if (!connected)
			return 0;                       /* refused or no answer: next round */
	}
	echoed = 0;
	fill((void *)(txbuf + sizeof(struct vhdr)), 16, pattern);
	vsend(OP_RW, 64);
	u32 until = ticks + 5000 / SOAK_TICK_MS;
	while (connected && echoed < 64 && (int)(until - ticks) > 0) {
		idle();
		vsock_poll(pattern);
	}
	if (echoed != 64) {
		if (connected)
			vsend(OP_RST, 0);
		connected = 0;
		return 0;
	}
	return 1;
}

/* -- the command line (hvm_start_info.cmdline_paddr) */
static u32 hex(const char *s, const char **end)
{
	u32 v = 0;
	for (;; s++) {
		u32 d = *s >= '0' && *s <= '9' ? (u32)(*s - '0')
			: *s >= 'a' && *s <= 'f' ? (u32)(*s - 'a' + 10) : 99;
		if (d == 99)
			break;
		v = v * 16 + d;
	}
	*end = s;
	return v;
}

/* soak.ticks=N on the command line: timer ticks to sleep between rounds (default 10) */
static u32 round_ticks(const char *cmdline)
{
	static const char key[] = "soak.ticks=";
	for (const char *p = cmdline; *p; p++) {
		int i = 0;
		while (key[i] && p[i] == key[i])
			i++;
		if (key[i])
			continue;
		u32 v = 0;
		for (p += i; *p >= '0' && *p <= '9'; p++)
			v = v * 10 + (u32)(*p - '0');
		return v ? v : 1;
	}
	return 10;
}

static void find_devices(const char *cmdline, u64 *blk_dev, u64 *vsock_dev)
{
	static const char key[] = "virtio_mmio.device=";
	for (const char *p = cmdline; *p; p++) {
		int i = 0;
		while (key[i] && p[i] == key[i])
			i++;
		if (key[i])
			continue;
		const char *at = p + i;
		while (*at && *at != '@')
			at++;
		if (at[0] != '@' || at[1] != '0' || at[2] != 'x')
			continue;
		u32 base = hex(at + 3, &at);
		if (r32(base) != 0x74726976)
			continue;
		u32 id = r32(base + 8);
		if (id == 2)
			*blk_dev = base;
		else if (id == 19)
			*vsock_dev = base;
	}
}

static void user_main(void);

/* CPL0: the IDT, the TSS, the LAPIC timer; then CPL3 */
void kmain(void)
{
	for (int v = 0; v < 256; v++) {
		u64 h = v == IDLE_VECTOR ? (u64)idle_isr : v < 32 ? (u64)fault_isr
			: v == TIMER_VECTOR ? (u64)timer_isr : (u64)other_isr;
		u64 dpl = 0;
		idt[2 * v] = (h & 0xFFFF) | (0x08ull << 16) | ((0x8Eull | dpl << 5) << 40)
			| ((h >> 16) & 0xFFFF) << 48;
		idt[2 * v + 1] = h >> 32;
	}
	struct __attribute__((packed)) { u16 limit; u64 base; } idtr = {sizeof(idt) - 1, (u64)idt};
	__asm__ volatile("lidt %0" : : "m"(idtr));
	/* TSS (SDM vol. 3A 8.7): RSP0, then an I/O bitmap of 65536 zero bits (every port
	 * allowed at CPL3) and its terminating 0xFF byte */
	fill((void *)TSS, (104 + 8192) / 4, 0);
	*(volatile u64 *)(TSS + 4) = KSTACK;
	*(volatile u16 *)(TSS + 102) = 104;
	*(volatile u8 *)(TSS + 104 + 8192) = 0xFF;
	u64 limit = 104 + 8192, base = TSS;
	gdt[5] = (limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | 0x89ull << 40 | ((limit >> 16) & 0xF) << 48
		| ((base >> 24) & 0xFF) << 56;
	gdt[6] = base >> 32;
	__asm__ volatile("ltr %w0" : : "r"(0x28));
	/* The 8259 PICs masked (the PIT's IRQ 0 would arrive through an uninitialized PIC
	 * as vector 8) and LINT0/LINT1 masked: only the LAPIC timer interrupts */
	outb(0x21, 0xFF);
	outb(0xA1, 0xFF);
	w32(LAPIC + 0x350, 1u << 16);
	w32(LAPIC + 0x360, 1u << 16);
	/* LAPIC timer, periodic (SDM vol. 3A 11.5.4); KVM's APIC bus runs at 1 GHz */
	w32(LAPIC + 0xF0, 0x1FF);               /* SVR: enabled, spurious vector 0xFF */
	w32(LAPIC + 0x3E0, 0xB);                /* divide by 1 */
	w32(LAPIC + 0x320, TIMER_VECTOR | (1u << 17));
	w32(LAPIC + 0x380, SOAK_TICK_MS * 1000000u);
	enter_user(user_main);
}

static void user_main(void)
{
	u64 blk_dev = 0, vsock_dev = 0;
	/* hvm_start_info.cmdline_paddr (offset 24, xen/include/public/arch-x86/hvm/start_info.h) */
	const char *cmdline = (const char *)(u64)*(volatile u64 *)((u64)start_info + 24);
	find_devices(cmdline, &blk_dev, &vsock_dev);
	u32 sleep = round_ticks(cmdline);
	if (!blk_dev || !vsock_dev)
		fail("devices not found on the command line");
	dev_init(blk_dev, 1, &blk);
	blk_sectors = r32(blk_dev + 0x100) | ((u64)r32(blk_dev + 0x104) << 32);
	if (blk_sectors < 8)
		fail("blk capacity");
	blk_hdr = page(); blk_data = page(); blk_status = page();
	dev_init(vsock_dev, 3, vs);
	cid = r32(vsock_dev + 0x100) | ((u64)r32(vsock_dev + 0x104) << 32);
	for (int i = 0; i < RXBUFS; i++) {
		rxbuf[i] = page();
		post_rx(rxbuf[i]);
	}
	evbuf = page();
	post_event();
	txbuf = page();
	print("soak guest up\n");

	for (u32 round = 1;; round++) {
		u32 sector = round % (blk_sectors < 64 ? (u32)blk_sectors : 64u);
		u32 pattern = round * 0x01000193u;
		fill((void *)blk_data, 128, pattern);
		if (blk_req(1, sector) != 0)
			fail("blk write status");
		fill((void *)blk_data, 128, 0);
		if (blk_req(0, sector) != 0)
			fail("blk read status");
		if (!all((void *)blk_data, 128, pattern))
			fail("blk read data");
		/* '.': a round with its echo; 'x': the connection was (re)made and no echo came */
		outb(0x3f8, vsock_round(pattern) ? '.' : 'x');
		sleep_ticks(sleep);
	}
}
