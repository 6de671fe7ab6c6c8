        .intel_syntax noprefix
/*
 * The guest of scripts/bench_postcopy.py's QEMU runs: what `livemig bench --hot 64M` does,
 * for QEMU 7.2 (`-M pc -kernel`, multiboot: 32-bit protected mode, paging off, one vCPU).
 * It writes every page of RAM above 2 MiB once (the fill), writes 1 at 0x500 (the script
 * polls it with HMP `xp`), then rewrites pages of a 64 MiB hot set at 2 MiB (livemig's is at 0), chosen by a
 * xorshift32 generator, for good.
 *
 *   gcc -m32 -c postcopy_hot_guest.S -o g.o && ld -m elf_i386 -Ttext=0x100000 -e _start g.o -o g.elf
 */
        .code32
        .section .text
        .globl _start
        .align 4
mb:     .long 0x1BADB002
        .long 0x00000002          /* want the memory fields */
        .long -(0x1BADB002 + 0x00000002)
_start:
        mov esp, 0x90000
        mov ecx, [ebx + 8]        /* mem_upper, KiB above 1 MiB */
        add ecx, 1024
        shl ecx, 10               /* end of RAM below 4 GiB (bytes) */
        mov edi, 0x200000
fill:   mov [edi], edi
        mov dword ptr [edi + 4], 0x4c4d4947
        add edi, 4096
        cmp edi, ecx
        jb fill
        mov dword ptr [0x500], 1
        mov eax, 0x12345678       /* xorshift32 state */
        xor esi, esi              /* generation */
hot:    mov edx, eax
        shl edx, 13
        xor eax, edx
        mov edx, eax
        shr edx, 17
        xor eax, edx
        mov edx, eax
        shl edx, 5
        xor eax, edx
        mov edx, eax
        and edx, 0x3fff           /* page in 64 MiB */
        shl edx, 12
        add edx, 0x200000
        inc esi
        mov [edx], esi
        mov [edx + 8], eax
        jmp hot
