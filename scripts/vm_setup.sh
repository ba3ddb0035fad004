#!/bin/sh
# Set up what the real-VM test (tests/vm) needs, and cache it; safe to run again.
#
#   QEMU, busybox-static, socat   Debian packages, installed with apt-get
#   guest kernel + modules        Debian's linux-image-amd64 .deb, downloaded with
#                                 apt-get download and unpacked (never installed)
#   vhost-device-vsock 0.3.0      cargo install --locked, into the cache
#
# The cache is $SOCKETFORWARD_VM_CACHE (default: build/vm in the repo). What it
# found is written to $CACHE/vm.env (KEY=VALUE lines) for the test to read.
# Exits non-zero with a message naming the step that failed.
set -eu

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${SOCKETFORWARD_VM_CACHE:-$REPO/build/vm}
VHOST_VERSION=0.3.0
APT_PACKAGES="qemu-system-x86 busybox-static socat"

say() { echo "vm-setup: $*"; }
die() { echo "vm-setup: FAILED: $*" >&2; exit 1; }

mkdir -p "$CACHE"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

# 1. Debian packages (only when one is missing: no apt traffic on a warm machine).
missing=""
for pkg in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install$missing yourself"
    say "installing$missing with apt-get"
    as_root apt-get update -q || die "apt-get update"
    # shellcheck disable=SC2086
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        $missing || die "apt-get install$missing"
fi
QEMU=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not on PATH after install"
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (package busybox-static)"
SOCAT=$(command -v socat) || die "socat not on PATH after install"

# 2. Guest kernel: the .deb that linux-image-amd64 points at, unpacked in the cache.
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null \
    | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n 1)
if [ -z "$KPKG" ]; then
    # No package lists yet (fresh machine): fetch them once and ask again.
    as_root apt-get update -q || die "apt-get update"
    KPKG=$(apt-cache depends linux-image-amd64 \
        | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n 1)
fi
[ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 to a kernel package"
KVER=${KPKG#linux-image-}
KDIR=$CACHE/kernel/$KVER
if [ ! -f "$KDIR/.done" ]; then
    say "fetching guest kernel $KPKG"
    rm -rf "$CACHE/kernel" "$CACHE/debs"  # older kernels too
    mkdir -p "$CACHE/debs" "$KDIR"
    (cd "$CACHE/debs" && apt-get download -q -o APT::Sandbox::User=root "$KPKG") || die "apt-get download $KPKG"
    dpkg-deb -x "$CACHE"/debs/"$KPKG"_*.deb "$KDIR" || die "dpkg-deb -x $KPKG"
    rm -rf "$CACHE/debs"
    touch "$KDIR/.done"
fi
KERNEL=$KDIR/boot/vmlinuz-$KVER
MODULES=$KDIR/lib/modules/$KVER
[ -f "$KERNEL" ] || die "no kernel image at $KERNEL"
[ -f "$MODULES/modules.order" ] || die "no modules.order in $MODULES"

# 3. vhost-device-vsock, built once into the cache.
VHOST=$CACHE/cargo/bin/vhost-device-vsock
if [ ! -x "$VHOST" ] || ! "$VHOST" --version 2>/dev/null | grep -q "$VHOST_VERSION"; then
    CARGO=$(command -v cargo || true)
    [ -n "$CARGO" ] || [ ! -x "$HOME/.cargo/bin/cargo" ] || CARGO=$HOME/.cargo/bin/cargo
    [ -n "$CARGO" ] || die "cargo not found (needed to build vhost-device-vsock $VHOST_VERSION)"
    say "building vhost-device-vsock $VHOST_VERSION with cargo (about a minute)"
    "$CARGO" install --locked --quiet --root "$CACHE/cargo" \
        --version "$VHOST_VERSION" vhost-device-vsock \
        || die "cargo install vhost-device-vsock $VHOST_VERSION"
fi

cat >"$CACHE/vm.env.tmp" <<EOF
QEMU=$QEMU
BUSYBOX=$BUSYBOX
SOCAT=$SOCAT
KERNEL=$KERNEL
MODULES=$MODULES
VHOST_DEVICE_VSOCK=$VHOST
EOF
mv "$CACHE/vm.env.tmp" "$CACHE/vm.env"
say "ready ($CACHE/vm.env): kernel $KVER, $($QEMU --version | head -n 1)"
