#!/bin/busybox sh
# /init of the test guest's initramfs (tests/vm/vm.py fills in @MODULES@).
# Loads the virtio, vsock and 9p modules, mounts the host's / read-only over
# virtio-9p, tmpfs on /tmp and /run, the checkout read-only and the run's share
# (writable), each at the same path as on the host, then runs $sfshare/guest.sh chrooted there and powers
# off. The kernel passes sfshare=... from its command line as an environment
# variable.
B=/bin/busybox
$B mkdir -p /proc /sys /dev /newroot
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
echo "SF-INIT uptime $($B cut -d' ' -f1 /proc/uptime)"
for m in @MODULES@; do
    $B insmod "/modules/$m.ko" || echo "SF-INIT insmod $m failed"
done
fail() { echo "SF-INIT FAILED: $*"; $B sync; $B poweroff -f; }
O=trans=virtio,version=9p2000.L,msize=262144
$B mount -t 9p -o "$O,ro" hostroot /newroot || fail "mount hostroot"
$B mount -t proc proc /newroot/proc
$B mount -t sysfs sysfs /newroot/sys
$B mount -t devtmpfs devtmpfs /newroot/dev
$B mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
$B mount -t tmpfs -o mode=755 tmpfs /newroot/run
if [ -n "${sfrepo:-}" ]; then
    $B mkdir -p "/newroot$sfrepo"
    $B mount -t 9p -o "$O,ro" repo "/newroot$sfrepo" || fail "mount repo"
fi
[ -n "${sfshare:-}" ] || fail "no sfshare= on the kernel command line"
$B mkdir -p "/newroot$sfshare"
$B mount -t 9p -o "$O,rw" work "/newroot$sfshare" || fail "mount share"
echo "SF-INIT chroot uptime $($B cut -d' ' -f1 /proc/uptime)"
$B chroot /newroot /bin/sh "$sfshare/guest.sh"
echo "SF-INIT guest.sh exit $?"
$B sync
$B poweroff -f
