/* Entry of a C tiny guest: the host set up the stack; call main and report its status. */
	.section .text.start, "ax"
	.globl _start
_start:
	call main
	mov %rax, %rdi
	call guest_done
1:	hlt
	jmp 1b
