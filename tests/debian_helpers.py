"""Helpers for the Debian package tests: build the .deb, cached bookworm root file
systems, commands in a chroot, a flat apt repository.

Root file systems come from debootstrap once and are kept as tarballs under CACHE_DIR
(DLLAMA_TEST_CACHE, default /var/cache/dllama-test), so a second run unpacks in seconds
instead of bootstrapping for a minute (amd64) or several (arm64 under qemu-user).
Downloaded .debs are kept there too (apt's archives folder is bind-mounted), so the
booted containers, which have no route to a mirror, install from a local repository.

Every chroot command runs in a private mount namespace (unshare --mount): the /proc,
/dev and bind mounts it makes vanish with it, nothing is left mounted on the host when a
test fails half-way.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("DLLAMA_TEST_CACHE", "/var/cache/dllama-test"))
MIRROR = os.environ.get("DLLAMA_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# what a booted container needs besides minbase; the package's own Depends come from apt
SYSTEMD_PACKAGES = ("systemd", "systemd-sysv", "dbus", "iproute2")


def is_root() -> bool:
    return os.geteuid() == 0


def missing_tools(*tools: str) -> List[str]:
    return [t for t in tools if shutil.which(t, path=CLEAN_PATH) is None]


def run(cmd: Sequence[str], *, timeout: float = 600, check: bool = True, env=None,
        cwd=None) -> subprocess.CompletedProcess:
    """Run with a clean PATH; raise with the command's output tail when it fails."""
    full_env = {"PATH": CLEAN_PATH, "LC_ALL": "C.UTF-8", "HOME": os.environ.get("HOME", "/root")}
    # the cache folder and the mirror reach scripts/build-deb too: one cache for one run
    full_env.update({k: v for k, v in os.environ.items()
                     if k in ("DLLAMA_TEST_CACHE", "DLLAMA_DEBIAN_MIRROR")})
    full_env.update(env or {})
    r = subprocess.run(list(cmd), env=full_env, cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} exited {r.returncode}\n"
                             f"--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}")
    return r


@contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """One builder of a cached thing at a time (two pytest processes may share CACHE_DIR)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# ---- the package ------------------------------------------------------------------------
def tree_digest() -> str:
    """A digest of the files scripts/build-deb packs (tracked and untracked, not ignored)."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    h = hashlib.sha256()
    for name in sorted(n for n in names if n):
        path = ROOT / os.fsdecode(name)
        if path.is_file():
            h.update(name + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def build_deb(arch: str = "amd64", timeout: float = 1200) -> Path:
    """The .deb for `arch` in dist/, built by scripts/build-deb unless dist/ already holds
    one built from the same tree (the stamp file records the tree digest)."""
    digest = tree_digest()
    stamp = ROOT / "dist" / f".build-{arch}.stamp"
    with cache_lock(f"build-{arch}"):
        if stamp.exists():
            deb = ROOT / "dist" / stamp.read_text().split()[1]
            if stamp.read_text().split()[0] == digest and deb.exists():
                return deb
        args = ["bash", str(ROOT / "scripts" / "build-deb")]
        if arch != host_arch():
            args += ["--arch", arch]
        t0 = time.monotonic()
        r = run(args, timeout=timeout, cwd=ROOT)
        log.info("build-deb %s: %.1f s", arch, time.monotonic() - t0)
        debs = [line.split()[-1] for line in r.stdout.splitlines()
                if line.startswith("built ") and "-dbgsym_" not in line]
        assert debs, r.stdout[-2000:]
        deb = Path(debs[-1])
        stamp.write_text(f"{digest} {deb.name}\n")
        return deb


def host_arch() -> str:
    return run(["dpkg", "--print-architecture"]).stdout.strip()


def deb_field(deb: Path, field: str) -> str:
    return run(["dpkg-deb", "-f", str(deb), field]).stdout.strip()


# ---- root file systems ------------------------------------------------------------------
def rootfs_tarball(arch: str = "amd64", include: Sequence[str] = SYSTEMD_PACKAGES,
                   name: Optional[str] = None) -> Path:
    """A cached tarball of a bookworm minbase root file system with `include` added."""
    name = name or f"{SUITE}-{arch}-{hashlib.sha256(' '.join(include).encode()).hexdigest()[:8]}"
    tarball = CACHE_DIR / f"{name}.tar"
    with cache_lock(name):
        if tarball.exists():
            return tarball
        with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
            target = Path(tmp) / "root"
            t0 = time.monotonic()
            cmd = ["debootstrap", "--variant=minbase", f"--arch={arch}"]
            if include:
                cmd.append("--include=" + ",".join(include))
            if arch != host_arch():
                enable_binfmt(arch)
            run(cmd + [SUITE, str(target), MIRROR], timeout=1800)
            log.info("debootstrap %s: %.0f s", name, time.monotonic() - t0)
            (target / "etc/apt/apt.conf.d/99dllama-test").write_text(
                'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n'
                'Binary::apt::APT::Keep-Downloaded-Packages "true";\n')
            shutil.rmtree(target / "var/cache/apt/archives", ignore_errors=True)
            (target / "var/cache/apt/archives/partial").mkdir(parents=True)
            partial = tarball.with_suffix(".tar.partial")
            run(["tar", "-C", str(target), "--numeric-owner", "-cf", str(partial), "."],
                timeout=600)
            partial.rename(tarball)
        return tarball


def unpack(tarball: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    run(["tar", "-C", str(dest), "--numeric-owner", "-xf", str(tarball)], timeout=600)
    return dest


def enable_binfmt(arch: str) -> None:
    """Foreign binaries run through qemu-user-static (the F flag: usable in a chroot)."""
    qemu = {"arm64": "qemu-aarch64", "armhf": "qemu-arm"}[arch]
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)])
    if not (binfmt / qemu).exists():
        run(["update-binfmts", "--enable", qemu])


def chroot_sh(root: Path, script: str, *, binds: Optional[Dict[Path, str]] = None,
              timeout: float = 600, check: bool = True,
              env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run `script` with /bin/sh inside `root`, with /proc, /sys, /dev and `binds`
    ({host path: path inside}) mounted in a private mount namespace."""
    r = shlex.quote(str(root))
    mounts = [f"mount -t proc proc {r}/proc", f"mount --rbind /sys {r}/sys",
              f"mount --rbind /dev {r}/dev"]
    for host, inside in (binds or {}).items():
        target = f"{r}/{inside.lstrip('/')}"
        mounts.append(f"mkdir -p {shlex.quote(target)} && mount --bind "
                      f"{shlex.quote(str(host))} {shlex.quote(target)}")
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf") if Path("/etc/resolv.conf").exists() else None
    outer = " && ".join(mounts) + f" && exec chroot {r} /bin/sh -ec {shlex.quote(script)}"
    chroot_env = {"DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
    chroot_env.update(env or {})
    return run(["unshare", "--mount", "--propagation", "private", "sh", "-ec", outer],
               timeout=timeout, check=check, env=chroot_env)


def flat_repo(repo: Path, debs: Iterable[Path]) -> Path:
    """A flat apt repository (deb [trusted=yes] file:REPO ./) holding `debs`."""
    repo.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        shutil.copy(deb, repo / Path(deb).name)
    packages = run(["dpkg-scanpackages", "--multiversion", ".", "/dev/null"], cwd=repo).stdout
    (repo / "Packages").write_text(packages)
    return repo


def archives_dir(arch: str) -> Path:
    """Downloaded .debs kept between runs (bind-mounted as /var/cache/apt/archives)."""
    d = CACHE_DIR / f"archives-{SUITE}-{arch}"
    (d / "partial").mkdir(parents=True, exist_ok=True)
    return d


def sources_list(mirror: bool) -> str:
    lines = ["deb [trusted=yes] file:/srv/repo ./"]
    if mirror:
        lines += [f"deb {MIRROR} {SUITE} main", f"deb {MIRROR} {SUITE}-updates main",
                  f"deb http://deb.debian.org/debian-security {SUITE}-security main"]
    return "\n".join(lines) + "\n"


def apt_install(root: Path, repo: Path, packages: Sequence[str], *, arch: str = "amd64",
                mirror: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """`apt-get install packages` inside `root` from the flat `repo` (and the Debian
    mirror), keeping downloaded .debs in archives_dir(arch)."""
    (root / "etc/apt/sources.list").write_text(sources_list(mirror))
    # the guest's own policy: services are not started in a chroot
    script = ("apt-get update -qq && apt-get install -y -q " + " ".join(map(shlex.quote, packages)))
    return chroot_sh(root, script, binds={repo: "/srv/repo", archives_dir(arch): "/var/cache/apt/archives"},
                     timeout=timeout)


def dependency_debs(deb: Path, arch: str = "amd64") -> List[Path]:
    """Every .deb that `apt-get install` of `deb` pulls into the cached rootfs, downloaded
    once into archives_dir(arch): with them a container installs without a mirror."""
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
        root = unpack(rootfs_tarball(arch), Path(tmp) / "root")
        repo = flat_repo(Path(tmp) / "repo", [deb])
        (root / "etc/apt/sources.list").write_text(sources_list(True))
        chroot_sh(root, "apt-get update -qq && apt-get install -y -q --download-only dllama-node "
                  "&& cd /var/cache/apt/archives && ls *.deb > /srv/repo/needed.txt",
                  binds={repo: "/srv/repo", archives_dir(arch): "/var/cache/apt/archives"},
                  timeout=900)
        names = (repo / "needed.txt").read_text().split()
    own = deb.name.split("_")[0]
    return [archives_dir(arch) / n for n in names if not n.startswith(own + "_")]
