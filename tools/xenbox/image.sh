#!/bin/bash
# Stage "image": the bootable dom0 disk image + the pieces QEMU's multiboot loader needs.
#
# usage: image.sh ROOTFS DOMU_INITRD OUT
#   ROOTFS       cached rootfs dir (rootfs.sh), read only here: we customise a copy
#   DOMU_INITRD  the guest's busybox initramfs (domu-initrd stage)
#   OUT          empty dir: gets dom0.img, xen (gunzipped 32-bit ELF), dom0-vmlinuz, dom0-initrd
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOTFS=$1 DOMU_INITRD=$2 OUT=$3
R=$OUT/root.tmp
rm -rf "$R"
cp -a "$ROOTFS" "$R"

echo xenbox-dom0 > "$R/etc/hostname"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > "$R/etc/fstab"
# autologin root on the Xen console (hvc0): the host drives dom0 through the serial line
mkdir -p "$R/etc/systemd/system/serial-getty@hvc0.service.d"
cat > "$R/etc/systemd/system/serial-getty@hvc0.service.d/autologin.conf" <<'EOS'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,38400,9600 %I dumb
EOS
# /dev/xen/* for dom0 userspace (libxenevtchn, libxengnttab, privcmd, xenfs)
printf 'xen-evtchn\nxen-gntdev\nxen-gntalloc\nxen-privcmd\nxenfs\n9pnet_virtio\n9p\n' \
  > "$R/etc/modules-load.d/xenbox.conf"
mkdir -p "$R/var/log/xen/console" "$R/mnt/src" "$R/mnt/box"
# QEMU user networking: dom0 is 10.0.2.15 (hostfwd targets it), no DHCP client in minbase
cat > "$R/etc/systemd/network/10-xenbox.network" <<'EOS'
[Match]
Name=en* eth*
[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
EOS
# run by the host driver once the root shell is up (one short line on the serial console:
# Xen's console input drops characters of long lines)
cat > "$R/usr/local/sbin/xenbox-setup" <<'EOS'
#!/bin/bash
# Mount the shares and wait for xenstored + the toolstack (xen.service may still be starting).
set -e
o=trans=virtio,version=9p2000.L,msize=262144
mountpoint -q /mnt/src || mount -t 9p -o $o,ro src /mnt/src
mountpoint -q /mnt/box || mount -t 9p -o $o box /mnt/box
for i in $(seq 600); do
  xenstore-read /local/domain/0/name >/dev/null 2>&1 && xl list >/dev/null 2>&1 && exit 0
  sleep 0.2
done
echo "xenstored/xl not ready after 120 s" >&2; exit 1
EOS
chmod +x "$R/usr/local/sbin/xenbox-setup"
# the guest: dom0's own kernel (xen-fbfront/xen-kbdfront are built in) + the busybox initramfs
mkdir -p "$R/root/domU"
cp "$(ls "$R"/boot/vmlinuz-* | head -1)" "$R/root/domU/vmlinuz"
cp "$DOMU_INITRD" "$R/root/domU/initrd.gz"
cp "$HERE"/guest-*.cfg "$R/root/domU/"
# boot pieces for QEMU (multiboot: xen must be an uncompressed 32-bit ELF)
gunzip -c "$(ls "$R"/boot/xen-4.17*-amd64.gz | head -1)" > "$OUT/xen"
cp "$(ls "$R"/boot/vmlinuz-* | head -1)" "$OUT/dom0-vmlinuz"
cp "$(ls "$R"/boot/initrd.img-* | head -1)" "$OUT/dom0-initrd"
# ext4 image, no loop mount: rootfs size + 1 GiB headroom (sparse)
SZ=$(( $(du -sm "$R" | cut -f1) + 1024 ))
mkfs.ext4 -q -F -L xenroot -d "$R" "$OUT/dom0.img" "${SZ}M"
rm -rf "$R"
