/*
 * The reference VM's guest: the self-describing workload of `vm::workload`, step for step, as
 * x86-64 code. The VMM enters it in 64-bit mode with paging on (identity map: RAM at 0, the
 * system block at SYS_BASE), RDI = this vCPU's control block, RSP = its stack.
 *
 * Each step writes one RAM page that describes itself (magic, page number, generation, vCPU,
 * then a body derived from them): first the vCPU's share of the fill region, then pages of its
 * hot share chosen by its PRNG. Every DISK_EVERY steps it writes a page to the virtio-blk disk
 * (its own virtqueue, virtio-mmio), every SERIAL_EVERY steps vCPU 0 prints a line on COM1.
 * After every BATCH steps it writes PORT_PROGRESS, where the VMM paces it and stops it.
 * The PRNG stream, page contents and counters are those of `VcpuState::step`, so the VMM
 * checks what the guest did with the same code that checks the software vCPUs.
 *
 * Registers: r15 = control block, r14 = I/O area, rbp = shared data; the rest is scratch.
 */
        .intel_syntax noprefix
        .code64
        .include "layout.inc"

        .equ MAGIC_LO, 0x4c4d494750414745  /* "LMIGPAGE" */
        .equ VIRTIO_MAGIC, 0x74726976      /* "virt" */
        .equ MMIO, VIRTIO_MMIO_BASE
        .equ SHARED, SYS_BASE + SHARED_OFF

/* A port access: the guest runs at CPL 3 without I/O privilege, so its "ports" are a page of
 * MMIO (PIO_BASE + port) that exits to the VMM exactly as a port would. */
        .macro OUTB port
        movabs rdx, PIO_BASE + \port
        mov byte ptr [rdx], al
        .endm
        .macro OUTD port
        movabs rdx, PIO_BASE + \port
        mov dword ptr [rdx], eax
        .endm

        .text
        .globl entry
entry:
        movabs rbp, SHARED
        mov r15, rdi
        mov r14, [r15 + CB_IO]
        cmp qword ptr [r15 + CB_ID], 0
        jne wait_ready
        call boot_banner
        call disk_init
        mov qword ptr [rbp + SH_READY], 1
        jmp main_loop
wait_ready:
        cmp qword ptr [rbp + SH_READY], 0
        jne main_loop
        OUTB PORT_WAIT
        jmp wait_ready

main_loop:
        mov r13, BATCH
1:
        call step
        test rax, rax
        jz idle
        dec r13
        jnz 1b
        mov eax, BATCH
        OUTD PORT_PROGRESS
        jmp main_loop
idle:
        OUTB PORT_IDLE
        jmp main_loop

/* One step of VcpuState::step. Returns rax = 0 when idle (nothing done), 1 otherwise. */
step:
        mov rax, [r15 + CB_STEPS]
        cmp rax, [r15 + CB_FILL_PAGES]
        jb 2f
        mov rcx, [r15 + CB_HOT_PAGES]
        test rcx, rcx
        jnz 1f
        xor eax, eax
        ret
1:      call rng_next
        xor edx, edx
        div qword ptr [r15 + CB_HOT_PAGES]
        mov rsi, rdx
        add rsi, [r15 + CB_HOT_FIRST]
        jmp 3f
2:      mov rsi, [r15 + CB_FILL_FIRST]
        add rsi, rax
3:      mov rdx, [r15 + CB_STEPS]
        inc rdx
        mov [r15 + CB_STEPS], rdx
        mov rdi, rsi
        shl rdi, 12
        mov rcx, [r15 + CB_ID]
        call fill_page
        /* side effects: a disk write takes precedence over a serial line */
        mov rcx, [r15 + CB_DISK_EVERY]
        test rcx, rcx
        jz 4f
        mov rax, [r15 + CB_STEPS]
        xor edx, edx
        div rcx
        test rdx, rdx
        jnz 4f
        inc qword ptr [r15 + CB_DISK_WRITES]
        call rng_next
        shr rax, 16
        mov rbx, rax                  /* block number before reduction */
        call disk_write
        jmp 5f
4:      mov rcx, [r15 + CB_SERIAL_EVERY]
        test rcx, rcx
        jz 5f
        cmp qword ptr [r15 + CB_ID], 0
        jne 5f
        mov rax, [r15 + CB_STEPS]
        xor edx, edx
        div rcx
        test rdx, rdx
        jnz 5f
        call print_steps
5:      mov eax, 1
        ret

/* rax = xorshift64*(&cb.rng) */
rng_next:
        mov rax, [r15 + CB_RNG]
        mov rdx, rax
        shr rdx, 12
        xor rax, rdx
        mov rdx, rax
        shl rdx, 25
        xor rax, rdx
        mov rdx, rax
        shr rdx, 27
        xor rax, rdx
        mov [r15 + CB_RNG], rax
        movabs rdx, 0x2545f4914f6cdd1d
        imul rax, rdx
        ret

/* rax = splitmix64(rax); clobbers rdx */
splitmix:
        movabs rdx, 0x9e3779b97f4a7c15
        add rax, rdx
        mov rdx, rax
        shr rdx, 30
        xor rax, rdx
        movabs rdx, 0xbf58476d1ce4e5b9
        imul rax, rdx
        mov rdx, rax
        shr rdx, 27
        xor rax, rdx
        movabs rdx, 0x94d049bb133111eb
        imul rax, rdx
        mov rdx, rax
        shr rdx, 31
        xor rax, rdx
        ret

/*
 * fill_page(rdi = destination, rsi = page number, rdx = generation, rcx = vCPU):
 * header [magic, page, generation, vcpu], then xorshift64* words seeded by
 * splitmix(page ^ splitmix(generation ^ (vcpu << 48))) | 1. Clobbers rax, rdx, r8-r11.
 */
fill_page:
        movabs rax, MAGIC_LO
        mov [rdi], rax
        mov [rdi + 8], rsi
        mov [rdi + 16], rdx
        mov [rdi + 24], rcx
        mov r8, rcx
        shl r8, 48
        mov rax, rdx
        xor rax, r8
        call splitmix
        xor rax, rsi
        call splitmix
        or rax, 1
        mov r8, rax                   /* s */
        movabs r10, 0x2545f4914f6cdd1d
        lea r9, [rdi + 32]
        lea r11, [rdi + 4096]
1:      mov rax, r8
        shr rax, 12
        xor r8, rax
        mov rax, r8
        shl rax, 25
        xor r8, rax
        mov rax, r8
        shr rax, 27
        xor r8, rax
        mov rax, r8
        imul rax, r10
        mov [r9], rax
        add r9, 8
        cmp r9, r11
        jb 1b
        ret

/* Prints "vcpuN steps=S\n" on the serial console. */
print_steps:
        lea rsi, [rip + vcpu_str]
        call print_str
        mov rax, [r15 + CB_ID]
        call print_dec
        lea rsi, [rip + steps_eq]
        call print_str
        mov rax, [r15 + CB_STEPS]
        call print_dec
        mov al, 10
        OUTB PORT_SERIAL
        ret

/* Prints rax in decimal on COM1. */
print_dec:
        sub rsp, 32
        lea rdi, [rsp + 31]
        mov rcx, 10
1:      xor edx, edx
        div rcx
        add dl, '0'
        mov [rdi], dl
        dec rdi
        test rax, rax
        jnz 1b
        inc rdi
        lea r8, [rsp + 32]
2:      mov al, [rdi]
        OUTB PORT_SERIAL
        inc rdi
        cmp rdi, r8
        jb 2b
        add rsp, 32
        ret

/* Prints the NUL-terminated string at rsi on COM1. */
print_str:
1:      mov al, [rsi]
        test al, al
        jz 2f
        OUTB PORT_SERIAL
        inc rsi
        jmp 1b
2:      ret

boot_banner:
        lea rsi, [rip + banner]
        jmp print_str

/*
 * vCPU 0 brings the virtio-blk device up (virtio-mmio, version 2): one virtqueue per vCPU,
 * each with three descriptors set once (header, data page, status). Leaves
 * SH_DISK_BLOCKS = 0 when there is no usable device.
 */
disk_init:
        mov qword ptr [rbp + SH_DISK_BLOCKS], 0
        cmp qword ptr [rbp + SH_HAS_DISK], 0
        je 9f
        movabs rbx, MMIO
        cmp dword ptr [rbx + 0x000], VIRTIO_MAGIC
        jne 8f
        cmp dword ptr [rbx + 0x004], 2
        jne 8f
        cmp dword ptr [rbx + 0x008], 2          /* block device */
        jne 8f
        mov dword ptr [rbx + 0x070], 0          /* reset */
        mov dword ptr [rbx + 0x070], 1          /* ACKNOWLEDGE */
        mov dword ptr [rbx + 0x070], 3          /* DRIVER */
        mov dword ptr [rbx + 0x014], 1
        mov eax, [rbx + 0x010]
        test eax, 1                              /* VIRTIO_F_VERSION_1 */
        jz 8f
        mov dword ptr [rbx + 0x024], 1
        mov dword ptr [rbx + 0x020], 1
        mov dword ptr [rbx + 0x014], 0
        mov eax, [rbx + 0x010]
        and eax, 0x1000                          /* VIRTIO_BLK_F_MQ if offered */
        mov dword ptr [rbx + 0x024], 0
        mov [rbx + 0x020], eax
        mov dword ptr [rbx + 0x070], 11         /* FEATURES_OK */
        test dword ptr [rbx + 0x070], 8
        jz 8f
        /* enough queues for every vCPU? */
        mov rcx, [rbp + SH_NVCPUS]
        cmp rcx, 1
        je 1f
        test eax, 0x1000
        jz 8f
        movzx eax, word ptr [rbx + 0x100 + 34]
        cmp rax, rcx
        jb 8f
1:      xor r12, r12                              /* queue index = vCPU index */
2:      mov [rbx + 0x030], r12d
        cmp dword ptr [rbx + 0x034], QUEUE_SIZE
        jb 8f
        mov dword ptr [rbx + 0x038], QUEUE_SIZE
        /* this vCPU's I/O area */
        mov rax, r12
        imul rax, IO_SIZE
        movabs rdi, SYS_BASE + IO_OFF
        add rdi, rax
        /* descriptors: 0 header -> 1 data -> 2 status (device writes) */
        lea rax, [rdi + IO_HDR]
        mov [rdi + IO_DESC + 0], rax
        mov dword ptr [rdi + IO_DESC + 8], 16
        mov word ptr [rdi + IO_DESC + 12], 1    /* NEXT */
        mov word ptr [rdi + IO_DESC + 14], 1
        lea rax, [rdi + IO_BUF]
        mov [rdi + IO_DESC + 16], rax
        mov dword ptr [rdi + IO_DESC + 24], 4096
        mov word ptr [rdi + IO_DESC + 28], 1    /* NEXT */
        mov word ptr [rdi + IO_DESC + 30], 2
        lea rax, [rdi + IO_STATUS]
        mov [rdi + IO_DESC + 32], rax
        mov dword ptr [rdi + IO_DESC + 40], 1
        mov word ptr [rdi + IO_DESC + 44], 2    /* WRITE */
        mov word ptr [rdi + IO_DESC + 46], 0
        lea rax, [rdi + IO_DESC]
        mov [rbx + 0x080], eax
        shr rax, 32
        mov [rbx + 0x084], eax
        lea rax, [rdi + IO_AVAIL]
        mov [rbx + 0x090], eax
        shr rax, 32
        mov [rbx + 0x094], eax
        lea rax, [rdi + IO_USED]
        mov [rbx + 0x0a0], eax
        shr rax, 32
        mov [rbx + 0x0a4], eax
        mov dword ptr [rbx + 0x044], 1          /* QueueReady */
        inc r12
        cmp r12, [rbp + SH_NVCPUS]
        jb 2b
        mov dword ptr [rbx + 0x070], 15         /* DRIVER_OK */
        mov rax, [rbx + 0x100]                  /* capacity, 512-byte sectors */
        shr rax, 3
        mov [rbp + SH_DISK_BLOCKS], rax
        lea rsi, [rip + disk_ok]
        jmp print_str
8:      lea rsi, [rip + disk_bad]
        call print_str
9:      ret

/*
 * Writes the workload's disk block: rbx = block number before reduction. Waits until the
 * previous request of this vCPU completed, fills the data page as `VcpuState::step` does,
 * queues the request and notifies the device; does not wait for it to complete.
 */
disk_write:
        mov rcx, [rbp + SH_DISK_BLOCKS]
        test rcx, rcx
        jz 9f
1:      mov rax, [r15 + CB_SUBMITTED]
        cmp rax, [r15 + CB_COMPLETED]
        je 3f
        /* has the device completed it? used.idx moves past our count */
        movzx eax, word ptr [r14 + IO_USED + 2]
        cmp ax, word ptr [r15 + CB_COMPLETED]
        jne 2f
        OUTB PORT_WAIT
        jmp 1b
2:      inc qword ptr [r15 + CB_COMPLETED]
        cmp byte ptr [r14 + IO_STATUS], 0
        je 1b
        inc qword ptr [r15 + CB_IO_ERRORS]
        jmp 1b
3:      lea rdi, [r14 + IO_BUF]
        mov rsi, rbx
        mov rdx, [r15 + CB_DISK_WRITES]
        mov rcx, [r15 + CB_ID]
        call fill_page
        mov rax, rbx
        xor edx, edx
        div qword ptr [rbp + SH_DISK_BLOCKS]
        shl rdx, 3                              /* sector of the reduced block */
        mov dword ptr [r14 + IO_HDR], 1         /* VIRTIO_BLK_T_OUT */
        mov dword ptr [r14 + IO_HDR + 4], 0
        mov [r14 + IO_HDR + 8], rdx
        mov byte ptr [r14 + IO_STATUS], 0xff
        movzx eax, word ptr [r14 + IO_AVAIL + 2]
        mov ecx, eax
        and ecx, QUEUE_SIZE - 1
        mov word ptr [r14 + IO_AVAIL + 4 + rcx * 2], 0
        inc eax
        mov word ptr [r14 + IO_AVAIL + 2], ax  /* x86 keeps stores in order */
        inc qword ptr [r15 + CB_SUBMITTED]
        movabs rax, MMIO
        mov rcx, [r15 + CB_ID]
        mov [rax + 0x050], ecx                  /* QueueNotify */
9:      ret

banner:   .asciz "livemig guest: up\n"
vcpu_str: .asciz "vcpu"
steps_eq: .asciz " steps="
disk_ok:  .asciz "livemig guest: virtio-blk ready\n"
disk_bad: .asciz "livemig guest: virtio-blk unusable\n"
