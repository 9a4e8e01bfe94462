# A 64 KiB "BIOS" for QEMU's pc machine that paints a static test picture and halts.
# Linked at 0xF0000 (where QEMU maps the last 64 KiB of the firmware below 1 MiB).
#
# Why: SeaBIOS takes ~4 s to boot here and leaves a blinking text cursor (never static), and its
# grey-on-black text is a poor test of image encoders.  This firmware runs in milliseconds under
# TCG and leaves a 640x480x32 picture with gradients, XOR texture and solid bands, that never
# changes again.  qemu_vnc.py embeds the assembled bytes (TESTCARD_CODE); rebuild them with
#   as --32 -o t.o qemu_testcard.S && ld -m elf_i386 -Ttext 0xf0000 --oformat binary -o t.bin t.o
# Pixel (x, y) = 0x336699 where (y & 0x40) and x < 320, else R = (x ^ y) & 0xff, G = y & 0xff,
# B = x & 0xff (expected_testcard() in qemu_vnc.py computes the same picture).
# It needs TCG: under (nested) KVM here the real->protected mode far jump never completes.
.code16
.globl _start
_start:
  cli
  # PCI 00:02.0 (the std VGA, pinned with -device VGA,addr=02.0): BAR0 = 0xE0000000, mem+io on.
  mov $0xcf8, %dx
  mov $0x80001010, %eax
  out %eax, %dx
  mov $0xcfc, %dx
  mov $0xE0000000, %eax
  out %eax, %dx
  mov $0xcf8, %dx
  mov $0x80001004, %eax
  out %eax, %dx
  mov $0xcfc, %dx
  mov $0x0003, %ax
  out %ax, %dx
  # Attribute controller index with bit 5 (video enabled), or QEMU shows a blank screen.
  mov $0x3da, %dx
  in %dx, %al
  mov $0x3c0, %dx
  mov $0x20, %al
  out %al, %dx
  # Bochs DISPI: 640x480x32, enabled, linear framebuffer.
  mov $0x1ce, %dx
  mov $4, %ax
  out %ax, %dx
  mov $0x1cf, %dx
  xor %ax, %ax
  out %ax, %dx
  mov $0x1ce, %dx
  mov $1, %ax
  out %ax, %dx
  mov $0x1cf, %dx
  mov $640, %ax
  out %ax, %dx
  mov $0x1ce, %dx
  mov $2, %ax
  out %ax, %dx
  mov $0x1cf, %dx
  mov $480, %ax
  out %ax, %dx
  mov $0x1ce, %dx
  mov $3, %ax
  out %ax, %dx
  mov $0x1cf, %dx
  mov $32, %ax
  out %ax, %dx
  mov $0x1ce, %dx
  mov $4, %ax
  out %ax, %dx
  mov $0x1cf, %dx
  mov $0x41, %ax
  out %ax, %dx
  # Flat 32-bit protected mode.
  lgdtl %cs:(gdt_desc - _start)
  mov %cr0, %eax
  or $1, %al
  mov %eax, %cr0
  ljmpl $0x08, $pm32
.code32
pm32:
  mov $0x10, %ax
  mov %ax, %ds
  mov %ax, %es
  mov %ax, %ss
  cld
  mov $0xE0000000, %edi
  xor %esi, %esi            # y
row:
  xor %ecx, %ecx            # x
col:
  test $0x40, %esi
  jz pattern
  cmp $320, %ecx
  jae pattern
  mov $0x00336699, %eax
  jmp put
pattern:
  mov %ecx, %eax
  xor %esi, %eax
  and $0xff, %eax
  shl $8, %eax
  mov %esi, %ebx
  mov %bl, %al
  shl $8, %eax
  mov %cl, %al
put:
  stosl
  inc %ecx
  cmp $640, %ecx
  jne col
  inc %esi
  cmp $480, %esi
  jne row
halt:
  hlt
  jmp halt
.p2align 3
gdt:
  .quad 0
  .quad 0x00cf9a000000ffff
  .quad 0x00cf92000000ffff
gdt_desc:
  .word gdt_desc - gdt - 1
  .long gdt
.org 0xfff0
.code16
  ljmp $0xf000, $0
.org 0x10000
