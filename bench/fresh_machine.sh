#!/usr/bin/env bash
# The README's two commands on a fresh Debian bookworm machine, all set-up included. The
# fresh machine is a bookworm minbase root file system (debootstrap with systemd, what
# tests/debian_helpers.py makes and caches under /var/cache/dllama-test): no Python, no
# compiler. This checkout's HEAD is cloned into it and the command is timed inside it
# (chroot, private mount namespace), so the Debian packages and the PyPI wheels are
# downloaded as on a new board.
#
#   sudo bash bench/fresh_machine.sh                # `bash scripts/run`: the demo, then the time
#   sudo bash bench/fresh_machine.sh setup          # `bash scripts/setup` (everything the tests
#                                                   # need), then every test dependency imports
#                                                   # and matches its pin, and nothing shadows it
#   KEEP=1 sudo bash bench/fresh_machine.sh ...     # keep the root file system afterwards
#
# Needs root and the network to reach Debian's and PyPI's registries.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
case $MODE in
  run) COMMAND="bash scripts/run" ;;
  # the import checks run from the clone's pytest: test_setup_pins imports every test
  # dependency, test_import_paths imports transformers' model classes with nothing shadowed
  setup) COMMAND="bash scripts/setup && .venv/bin/python -m pytest -q -p no:cacheprovider \
      tests/test_setup_pins.py tests/test_import_paths.py" ;;
  *) echo "fresh_machine: $MODE: expected run or setup" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "fresh_machine: needs root (chroot, mounts)" >&2; exit 2; }

tarball=$(.venv/bin/python -c "from tests.debian_helpers import rootfs_tarball; print(rootfs_tarball())")
root=$(mktemp -d /var/tmp/dllama-fresh.XXXXXX)
cleanup() {
  if findmnt -rn -o TARGET | grep -q "^$root"; then     # never delete through a mount
    echo "fresh_machine: mounts left under $root; not removing it" >&2
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
# so does the machine's own pip configuration: a machine of this kind may keep wheels on
# its disk (here torch's CPU wheel, named by a find-links in pip.conf); its configuration
# files are copied and the local folders they name are bind-mounted read-only
wheel_dirs=()
for conf in /etc/pip.conf /etc/xdg/pip /root/.config/pip /root/.pip; do
  [ -e "$conf" ] && mkdir -p "$root$(dirname "$conf")" && cp -r "$conf" "$root$(dirname "$conf")/"
done
for dir in $(.venv/bin/python -m pip config list 2>/dev/null \
             | grep -E '^[^=]*\.(find-links|index-url|extra-index-url)=' | cut -d= -f2- | tr -d "'" \
             | tr ' ' '\n' | sed -n 's#^\(file://\)\?\(/.*\)#\2#p'); do
  while [ ! -d "$dir" ] && [ "$dir" != / ]; do dir=$(dirname "$dir"); done
  [ "${dir##*/}" = simple ] && dir=$(dirname "$dir")     # an index links to ../files
  [ "$dir" != / ] && wheel_dirs+=("$dir")
done
git clone -q . "$root/root/dllama-node"
echo "== a fresh bookworm (minbase + systemd) in $root: $(chroot "$root" sh -c \
  'command -v python3 gcc || true' | wc -l) of python3, gcc present; running $COMMAND"

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
  for dir in $1; do mkdir -p "$0$dir" && mount --bind -o ro "$dir" "$0$dir"; done
  exec chroot "$0" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
    PIP_CERT=/etc/host-ca-bundle.crt \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    bash -c "cd /root/dllama-node && $2"' "$root" "$(printf '%s\n' "${wheel_dirs[@]}" | sort -u)" \
  "$COMMAND" || rc=$?
end=$(date +%s.%N)
printf "\n== %s on a fresh machine: exit %d, %s s in all (set-up included)\n" \
  "${COMMAND%% &&*}" "$rc" "$(awk "BEGIN { printf \"%.0f\", $end - $start }")"
exit "$rc"
