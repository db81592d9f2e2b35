#!/usr/bin/env bash
# How long the README's main command (`bash scripts/run`) takes on a fresh Debian bookworm
# machine, all set-up included. The fresh machine is a bookworm minbase root file system
# (debootstrap with systemd, what tests/debian_helpers.py makes and caches under
# /var/cache/dllama-test): no Python, no compiler. This checkout's HEAD is cloned into
# it and `bash scripts/run` is timed inside it (chroot, private mount namespace), so the
# Debian packages and the PyPI wheels are downloaded as on a new board.
#
#   sudo bash bench/fresh_machine_demo.sh            # prints the demo, then the time
#   KEEP=1 sudo bash bench/fresh_machine_demo.sh     # keep the root file system afterwards
#
# Needs root and the network to reach Debian's and PyPI's registries.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "fresh_machine_demo: needs root (chroot, mounts)" >&2; exit 2; }

tarball=$(.venv/bin/python -c "from tests.debian_helpers import rootfs_tarball; print(rootfs_tarball())")
root=$(mktemp -d /var/tmp/dllama-fresh.XXXXXX)
cleanup() {
  if findmnt -rn -o TARGET | grep -q "^$root"; then     # never delete through a mount
    echo "fresh_machine_demo: mounts left under $root; not removing it" >&2
  elif [ -z "${KEEP:-}" ]; then
    rm -rf "$root"
  fi
}
trap cleanup EXIT
tar -C "$root" -xf "$tarball"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# a network that inspects TLS has its own authority in the host's bundle: pip gets it too
# (PIP_CERT below); that is a property of the network, not of the set-up being timed
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/host-ca-bundle.crt"
git clone -q . "$root/root/dllama-node"
echo "== a fresh bookworm (minbase + systemd) in $root: $(chroot "$root" sh -c \
  'command -v python3 gcc || true' | wc -l) of python3, gcc present; running bash scripts/run"

start=$(date +%s.%N)
rc=0
unshare --mount --propagation private bash -c '
  set -e
  mount --bind "$0" "$0"          # a mount point as the root, as on a booted machine (ip netns)
  mount -t proc proc "$0/proc"
  mount --rbind /sys "$0/sys"
  mount --rbind /dev "$0/dev"
  mount -t tmpfs tmpfs "$0/run"
  mount -t tmpfs tmpfs "$0/tmp"
  exec chroot "$0" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
    PIP_CERT=/etc/host-ca-bundle.crt \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    bash -c "cd /root/dllama-node && bash scripts/run"' "$root" || rc=$?
end=$(date +%s.%N)
printf "\n== bash scripts/run on a fresh machine: exit %d, %s s in all (set-up included)\n" \
  "$rc" "$(awk "BEGIN { printf \"%.0f\", $end - $start }")"
exit "$rc"
