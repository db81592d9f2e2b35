"""dllama-ctl key: file modes, refusals, validation that names what is wrong, and key ids
that agree with cluster/auth.py's reader (the daemon's side of the same file)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dllama_node.cluster import auth
from dllama_node.common import errors
from dllama_node.ctl.cli import cli

CTL = os.path.join(os.path.dirname(sys.executable), "dllama-ctl")
HEX = "0123456789abcdef" * 4


def runner() -> CliRunner:
    """stdout and stderr apart (click 8.2 does it by default, 8.1 needs mix_stderr)."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def invoke(*args, stdin=None):
    return runner().invoke(cli, list(args), input=stdin)


def test_generate_writes_0600_key_and_prints_its_id(tmp_path):
    path = tmp_path / "etc" / "cluster.key"          # the folder does not exist yet
    r = invoke("key", "generate", "--key-file", str(path))
    assert r.exit_code == 0, r.stderr
    key = auth.read_key(path)
    assert len(key) == auth.KEY_BYTES
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert f"key id {auth.key_id(key)}" in r.stdout
    assert str(path) in r.stdout
    assert key.hex() not in r.stdout + r.stderr


def test_generate_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "cluster.key"
    auth.write_key(path, bytes(range(32)))
    r = invoke("key", "generate", "--key-file", str(path))
    assert r.exit_code == errors.EXIT_USAGE
    assert "already exists" in r.stderr and "--force" in r.stderr
    assert auth.read_key(path) == bytes(range(32))

    r = invoke("key", "generate", "--key-file", str(path), "--force")
    assert r.exit_code == 0, r.stderr
    new = auth.read_key(path)
    assert new != bytes(range(32))
    assert auth.key_id(new) in r.stdout
    assert "systemctl restart dllama-node" in r.stderr


def test_generate_if_missing_keeps_an_existing_key_quietly(tmp_path):
    path = tmp_path / "cluster.key"
    r = invoke("key", "generate", "--key-file", str(path), "--if-missing")
    assert r.exit_code == 0 and "key id" in r.stdout
    first = auth.read_key(path)
    r = invoke("key", "generate", "--key-file", str(path), "--if-missing")
    assert r.exit_code == 0
    assert r.stdout == "" and r.stderr == ""
    assert auth.read_key(path) == first


def test_generate_if_missing_warns_about_a_broken_key_but_succeeds(tmp_path):
    path = tmp_path / "cluster.key"
    path.write_text("not a key\n")
    os.chmod(path, 0o600)
    r = invoke("key", "generate", "--key-file", str(path), "--if-missing")
    assert r.exit_code == 0
    assert "warning" in r.stderr and "--force" in r.stderr
    assert path.read_text() == "not a key\n"


@pytest.mark.parametrize("how", ["argument", "stdin"])
def test_set_then_id_and_show_round_trip(tmp_path, how):
    path = str(tmp_path / "cluster.key")
    if how == "argument":
        r = invoke("key", "set", "--key-file", path, HEX)
    else:
        r = invoke("key", "set", "--key-file", path, "-", stdin=f"  {HEX.upper()}\n")
    assert r.exit_code == 0, r.stderr
    kid = auth.key_id(bytes.fromhex(HEX))
    assert f"key id {kid}" in r.stdout
    assert "systemctl restart dllama-node" in r.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert auth.read_key(path) == bytes.fromhex(HEX)

    r = invoke("key", "id", "--key-file", path)
    assert r.exit_code == 0 and r.stdout.strip() == kid

    r = invoke("key", "show", "--key-file", path)
    assert r.exit_code == 0
    assert r.stdout.strip() == HEX
    assert "secret" in r.stderr


def test_set_reads_stdin_by_default(tmp_path):
    path = str(tmp_path / "cluster.key")
    r = invoke("key", "set", "--key-file", path, stdin=HEX + "\n")
    assert r.exit_code == 0, r.stderr
    assert auth.read_key(path) == bytes.fromhex(HEX)


@pytest.mark.parametrize("text, words", [
    (HEX[:-1], ["64 hex digits", "found 63 characters"]),
    (HEX + "00", ["found 66 characters"]),
    ("", ["found 0 characters"]),
    (HEX[:9] + "g" + HEX[10:], ["character 10 of 64", "not a hex digit"]),
])
def test_set_rejects_bad_keys_naming_length_or_position(tmp_path, text, words):
    path = tmp_path / "cluster.key"
    auth.write_key(path, bytes(32))
    r = invoke("key", "set", "--key-file", str(path), "-", stdin=text)
    assert r.exit_code == errors.EXIT_USAGE, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("dllama-ctl: error: key from standard input")
    for w in words:
        assert w in line
    if text:
        assert text not in line                      # never echo what might be a key
    assert auth.read_key(path) == bytes(32)           # untouched


def test_id_of_missing_key_is_a_cluster_error(tmp_path):
    r = invoke("key", "id", "--key-file", str(tmp_path / "none.key"))
    assert r.exit_code == errors.EXIT_CLUSTER
    assert "does not exist" in r.stderr


def test_key_file_comes_from_the_config_file(tmp_path):
    path = tmp_path / "from-config.key"
    conf = tmp_path / "dllama-node.conf"
    conf.write_text(f"key_file = {path}\n")
    r = invoke("--config", str(conf), "key", "generate")
    assert r.exit_code == 0, r.stderr
    assert str(path) in r.stdout and path.exists()


def test_console_script_postinst_call(tmp_path):
    """What the Debian postinst runs, twice (install, then upgrade)."""
    path = str(tmp_path / "cluster.key")
    for _ in range(2):
        p = subprocess.run([CTL, "key", "generate", "--if-missing", "--key-file", path],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert "Traceback" not in p.stderr
    assert len(auth.read_key(path)) == auth.KEY_BYTES


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_replacing_keeps_owner_and_group(tmp_path):
    path = tmp_path / "cluster.key"
    auth.write_key(path, bytes(32))
    os.chown(path, 65534, 65534)
    r = invoke("key", "set", "--key-file", str(path), HEX)
    assert r.exit_code == 0, r.stderr
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert stat.S_IMODE(st.st_mode) == 0o600
