#!/bin/bash
# Stage "rmvm-initrd": the RM VM's initramfs (busybox + the kernel modules its /init loads).
#
# usage: rmvm-initrd.sh ROOTFS BUSYBOX OUT
#   ROOTFS   cached rootfs dir (rootfs.sh): the modules come from its kernel (the RM VM boots
#            dom0's kernel, the same one the image ships as /root/domU/vmlinuz)
#   BUSYBOX  a static busybox
#   OUT      empty dir: gets initrd.gz
# The RM VM's root filesystem is dom0's own image (read-only, tmpfs overlay; see rmvm-init), so
# only what is needed to mount it and reach Xen is here.  The project source is appended as a
# second cpio at run time (tests/xen/rmvm.py).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOTFS=$1 BUSYBOX=$2 OUT=$3
KVER=$(basename "$(ls -d "$ROOTFS"/lib/modules/* | head -1)")
M=$ROOTFS/lib/modules/$KVER
# Load order (insmod resolves no dependencies; modules.dep of 6.1.0: ext4 needs crc16, mbcache,
# jbd2; xenfs needs xen-privcmd; ext4/jbd2 checksums need the crc32c shash at mount time).
MODS="crc16 mbcache crc32c_generic jbd2 ext4 overlay xen-blkfront xen-netfront xen-evtchn
xen-gntdev xen-gntalloc xen-privcmd xenfs"
W=$OUT/root
mkdir -p "$W"/{bin,sbin,proc,sys,dev,etc,tmp,lib/modules}
cp "$BUSYBOX" "$W/bin/busybox"
for a in $("$BUSYBOX" --list); do
  [ "$a" = busybox ] || ln -s busybox "$W/bin/$a"
done
for m in $MODS; do
  rel=$(grep -E "(^|/)$m\.ko:" "$M/modules.dep" | cut -d: -f1)
  [ -n "$rel" ] || { echo "module $m not in $M/modules.dep" >&2; exit 1; }
  cp "$M/$rel" "$W/lib/modules/$m.ko"
done
# One module per line, with its parameters.  xen-privcmd unrestricted=1: in a domU, Linux 6.1
# (Debian's, with "xen/privcmd: restrict usage in unprivileged domU") otherwise reads
# ~/target from xenstore once, at load, and lets privcmd reach only that domain -- or none
# ("No target domain found, blocking all hypercalls", seen here).  The RM VM's target changes
# with every migration (the guest gets a new domid) and privcmd cannot re-read it, so the
# kernel-side filter is off and Xen's own check is what applies: the XEN_DOMCTL_set_target
# that dom0 gives the RM VM over exactly its guest (tests/xen/rmvm_dom0.py).
for m in $MODS; do
  case $m in
    xen-privcmd) echo "$m unrestricted=1" ;;
    *) echo "$m" ;;
  esac
done > "$W/lib/modules/order"
cp "$HERE/rmvm-init" "$W/init"
chmod 755 "$W/init"
(cd "$W" && find . | cpio -o -H newc --quiet) | gzip -9 -n > "$OUT/initrd.gz"
rm -rf "$W"
