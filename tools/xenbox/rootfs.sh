#!/bin/bash
# Stage "rootfs": a Debian dom0 root filesystem with Xen 4.17, kernel 6.1 and the project's runtime
# dependencies, all from Debian packages (no pip, no network needed in dom0 later).
#
# usage: rootfs.sh DEST   (env: SUITE, MIRROR, PKGS = comma-separated extra packages)
# DEST must not exist; the caller (xenbox.py) renames it into the cache when this succeeds,
# so an interrupted run never leaves a half-built rootfs that looks finished.
set -euo pipefail
DEST=$1
: "${SUITE:?}" "${MIRROR:?}" "${PKGS:?}"
debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$DEST" "$MIRROR"

# Things that need the rootfs' own binaries (chroot) are done here, once, not per image.
chroot "$DEST" passwd -d root >/dev/null
# xenconsoled logs every guest console to /var/log/xen/console/guest-<name>.log: the tests
# read the guest's hvc0 there.
grep -q '^XENCONSOLED_ARGS=' "$DEST/etc/default/xen" \
  || echo 'XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"' >> "$DEST/etc/default/xen"
# Never wait for a network that has no DHCP server; networkd gets a static address (image stage).
chroot "$DEST" systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1 || true
chroot "$DEST" systemctl enable systemd-networkd.service >/dev/null 2>&1
# 140 MB of downloaded .debs are not needed in the image.
rm -f "$DEST"/var/cache/apt/archives/*.deb
du -sh "$DEST"
