"""The Debian package: it builds with a clean PATH, lintian finds no error or warning,
and `apt-get install dllama-node` from a local repository works in a fresh bookworm
chroot, where dllama-ctl and the daemon's self-check run on Debian's own python3 and
python3-* packages (nothing from PyPI). Purge removes state and key.

Root only (debootstrap, chroot); the chroot's root file system is cached as a tarball
(tests/debian_helpers.py), the first run bootstraps it (about 40 s).
"""
from __future__ import annotations

import json
import tempfile
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import debian_helpers as dh

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dh.is_root(), reason="needs root (debootstrap, chroot, dpkg-buildpackage)"),
    pytest.mark.skipif(bool(dh.missing_tools("dpkg-buildpackage", "lintian", "debootstrap",
                                             "dpkg-scanpackages", "unshare")),
                       reason="missing tools: " + " ".join(dh.missing_tools(
                           "dpkg-buildpackage", "lintian", "debootstrap", "dpkg-scanpackages",
                           "unshare"))),
]

# What the code imports at run time, as Debian packages (pyproject's dependencies plus
# the journal); a new import without its Depends fails the chroot test below.
EXPECTED_DEPENDS = {"python3-numpy", "python3-click", "python3-zeroconf", "python3-sentencepiece",
                    "python3-protobuf", "python3-regex", "python3-jinja2", "python3-systemd",
                    "adduser"}


@pytest.fixture(scope="module")
def deb() -> Path:
    t0 = time.monotonic()
    path = dh.build_deb()
    print(f"\nbuild (or reuse) {path.name}: {time.monotonic() - t0:.1f} s")
    return path


def test_depends_are_debian_packages(deb):
    depends = dh.deb_field(deb, "Depends")
    names = {re.split(r"[ (:]", d.strip())[0] for d in depends.split(",")}
    assert EXPECTED_DEPENDS <= names, depends
    assert all(n.startswith(("python3", "lib", "adduser")) for n in names), depends


def test_contents(deb):
    listing = dh.run(["dpkg-deb", "-c", str(deb)]).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for needed in ["/usr/bin/dllama-node", "/usr/bin/dllama-ctl",
                   "/lib/systemd/system/dllama-node.service",
                   "/etc/dllama-node/dllama-node.conf",
                   "/usr/share/man/man8/dllama-node.8.gz", "/usr/share/man/man1/dllama-ctl.1.gz"]:
        assert needed in paths, needed
    assert any(re.search(r"/dllama_node/kernels/_kernels\.cpython-3\d+-.*\.so$", p) for p in paths)
    assert any(re.search(r"/dllama_node/cluster/_mesh_exchange\.cpython-3\d+-.*\.so$", p)
               for p in paths)
    assert not any(p.endswith(("_kernels.c", "_mesh_exchange.c")) for p in paths)   # generated C
    conffiles = dh.run(["dpkg-deb", "-I", str(deb), "conffiles"]).stdout.split()
    assert conffiles == ["/etc/dllama-node/dllama-node.conf"]
    if (dh.ROOT / "demo" / "stories.gguf").exists():
        assert "/usr/share/dllama-node/models/stories.gguf" in paths


def test_lintian_clean(deb):
    changes = deb.with_name(deb.name.replace(".deb", ".changes"))
    t0 = time.monotonic()
    r = dh.run(["lintian", "--fail-on", "error,warning", "--display-info", str(changes)],
               check=False, timeout=300)
    print(f"\nlintian: {time.monotonic() - t0:.1f} s\n{r.stdout}")
    tags = [line for line in r.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert tags == [] and r.returncode == 0, r.stdout + r.stderr


def test_overrides_are_justified():
    """Every lintian override has a comment above it saying why."""
    text = (dh.ROOT / "packaging/debian/dllama-node.lintian-overrides").read_text().splitlines()
    for i, line in enumerate(text):
        if line.strip() and not line.startswith("#"):
            assert i > 0 and text[i - 1].startswith("#"), line


@pytest.fixture(scope="module")
def installed(deb, tmp_path_factory):
    """A fresh bookworm chroot with dllama-node installed by apt from a flat repository."""
    tmp = tmp_path_factory.mktemp("chroot")
    t0 = time.monotonic()
    root = dh.unpack(dh.rootfs_tarball("amd64"), tmp / "root")
    t1 = time.monotonic()
    repo = dh.flat_repo(tmp / "repo", [deb])
    dh.apt_install(root, repo, ["dllama-node"])
    t2 = time.monotonic()
    print(f"\nchroot: unpack {t1 - t0:.1f} s, apt-get install {t2 - t1:.1f} s")
    return root


def test_installed_commands_run_on_debian_python(installed):
    r = dh.chroot_sh(installed, "dllama-ctl --version; head -1 /usr/bin/dllama-ctl")
    assert "dllama-ctl, version 0.1.0" in r.stdout
    assert r.stdout.splitlines()[1] == "#!/usr/bin/python3"
    r = dh.chroot_sh(installed, "dllama-node --check --json")
    report = json.loads(r.stdout)
    assert report["kernel_path"] in report["kernel_paths_available"]
    assert report["cores"] >= 1 and report["mem_total_bytes"] > 0
    # the modules come from the package, nothing from a virtual environment or PyPI
    r = dh.chroot_sh(installed, "python3 -c 'import dllama_node.kernels as k, numpy, zeroconf; "
                     "print(k.__file__); print(numpy.__file__); print(zeroconf.__version__)'")
    kernels_file, numpy_file, zc_version = r.stdout.split()
    assert kernels_file.startswith("/usr/lib/python3/dist-packages/dllama_node/")
    assert numpy_file.startswith("/usr/lib/python3/dist-packages/")
    assert zc_version.startswith("0.47")


def test_demo_model_gives_the_same_tokens_on_debian_python(installed):
    """The demo model end to end on Debian's packages -- its SentencePiece vocabulary built
    through python3-sentencepiece 0.1.97's own ModelProto module on python3-protobuf 3.21,
    Debian's numpy under the kernels -- gives the greedy tokens the virtual environment gives."""
    if not (dh.ROOT / "demo" / "stories.gguf").exists():
        pytest.skip("no demo/stories.gguf in this tree")
    args = "generate --prompt 'Once upon a time' --max-tokens 8 --temperature 0 --json --model "
    r = dh.chroot_sh(installed, "dllama-ctl " + args + "/usr/share/dllama-node/models/stories.gguf")
    on_debian = json.loads(r.stdout)
    ctl = Path(sys.executable).with_name("dllama-ctl")
    here = json.loads(subprocess.run(f"{ctl} {args}{dh.ROOT / 'demo' / 'stories.gguf'}", shell=True,
                                     capture_output=True, text=True, check=True).stdout)
    assert (on_debian["prompt_tokens"], on_debian["tokens"]) == (here["prompt_tokens"], here["tokens"])
    r = dh.chroot_sh(installed, "python3 -c 'import google.protobuf, sentencepiece; "
                     "print(google.protobuf.__file__, sentencepiece.__version__)'")
    protobuf_file, sentencepiece_version = r.stdout.split()
    assert protobuf_file.startswith("/usr/lib/python3/dist-packages/")
    assert sentencepiece_version.startswith("0.1.97")


def test_postinst_made_user_state_and_key(installed):
    r = dh.chroot_sh(installed, "getent passwd dllama; stat -c '%U:%G %a' /var/lib/dllama-node "
                     "/etc/dllama-node/cluster.key; dllama-ctl key id; "
                     "ls /etc/systemd/system/multi-user.target.wants/")
    lines = r.stdout.splitlines()
    user = lines[0].split(":")
    assert user[0] == "dllama" and user[5] == "/var/lib/dllama-node"
    assert user[6] in ("/usr/sbin/nologin", "/bin/false")
    assert int(user[2]) < 1000                                     # a system user
    assert lines[1] == "dllama:dllama 750"
    assert lines[2] == "dllama:dllama 600"
    assert re.search(r"[0-9a-f]{8,}", lines[3])                   # the key id
    assert "dllama-node.service" in lines[4:]                      # enabled


def test_man_pages_render(installed):
    for page in ("/usr/share/man/man8/dllama-node.8.gz", "/usr/share/man/man1/dllama-ctl.1.gz"):
        r = subprocess.run(f"zcat {installed}{page} | groff -man -Tutf8 -ww -z",
                           shell=True, capture_output=True, text=True)
        assert r.returncode == 0 and r.stderr == "", (page, r.stderr)


def test_reinstall_keeps_the_key_and_purge_removes_state(installed):
    before = dh.chroot_sh(installed, "dllama-ctl key id").stdout
    dh.chroot_sh(installed, "apt-get install -y -q --reinstall dllama-node")
    assert dh.chroot_sh(installed, "dllama-ctl key id").stdout == before
    dh.chroot_sh(installed, "touch /var/lib/dllama-node/slice.cache && apt-get purge -y -q dllama-node")
    assert dh.chroot_sh(installed, "getent passwd dllama").stdout.startswith("dllama:")
    assert not (installed / "etc/dllama-node").exists()
    assert not (installed / "var/lib/dllama-node").exists()


@pytest.mark.arm
@pytest.mark.skipif(bool(dh.missing_tools("qemu-aarch64-static", "update-binfmts")),
                    reason="needs qemu-user-static and binfmt-support (scripts/setup installs them)")
def test_arm64_package_builds_in_qemu_chroot():
    """scripts/build-deb --arch arm64: built in a bookworm arm64 chroot under qemu-user,
    where the build-time smoke test runs the NEON kernels against the numpy reference.
    On a fresh machine the build chroot is bootstrapped first (debootstrap under qemu,
    then the Build-Depends: about 6 minutes) and cached for the next run."""
    t0 = time.monotonic()
    deb = dh.build_deb("arm64", timeout=1500)
    print(f"\narm64 build (or reuse): {time.monotonic() - t0:.1f} s")
    assert dh.deb_field(deb, "Architecture") == "arm64"
    assert EXPECTED_DEPENDS <= {re.split(r"[ (:]", d.strip())[0]
                                for d in dh.deb_field(deb, "Depends").split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        dh.run(["dpkg-deb", "-x", str(deb), tmp])
        so = list(Path(tmp).glob("usr/lib/python3/dist-packages/dllama_node/kernels/_kernels*.so"))
        assert len(so) == 1 and so[0].name.endswith("-aarch64-linux-gnu.so"), so
        header = dh.run(["readelf", "-h", str(so[0])]).stdout
        assert "AArch64" in header
    changes = deb.with_name(deb.name.replace(".deb", ".changes"))
    r = dh.run(["lintian", "--fail-on", "error,warning", str(changes)], check=False, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
