"""Cluster-key authentication (cluster/auth.py): key files, the mutual challenge-response
over the HELLO / WELCOME / AUTH fields, replay and tampering, session keys (RFC 5869
vectors as the oracle for HKDF), and the key never on the wire or in a message.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
import stat
import tempfile

import pytest

from dllama_node.cluster.auth import (INITIATOR, KEY_BYTES, NONCE_BYTES, RESPONDER,
                                      AuthenticationError, ClusterKeyError, Handshake,
                                      generate_key, hkdf_sha256, key_id, make_proof, read_key,
                                      write_key)
from dllama_node.common.errors import ClusterError, ProtocolError
from tests.as_user import NOBODY_UID, effective_user

ROOT_ADDR, WORKER_ADDR = "10.0.0.1:9990", "10.0.0.2:9991"


def run_handshake(root_key, worker_key, cluster="lab", root_cluster=None, tamper=None):
    """The three messages as JSON bytes, both sides' Handshake, and the wire bytes.
    tamper(name, dict) may change a message on its way."""
    tamper = tamper or (lambda name, msg: msg)
    wire = []

    def send(name, msg):
        data = json.dumps(tamper(name, dict(msg))).encode()
        wire.append(data)
        return json.loads(data)

    root = Handshake(root_key, INITIATOR, root_cluster or cluster, "root")
    worker = Handshake(worker_key, RESPONDER, cluster, "w1")
    hello = send("HELLO", {"version": 1, **root.offer()})
    welcome = send("WELCOME", {"version": 1, "pid": 42, **worker.answer(hello, ROOT_ADDR)})
    auth = send("AUTH", root.confirm(welcome, WORKER_ADDR))
    worker.finish(auth)
    return root, worker, wire


# ---- the handshake -------------------------------------------------------------------
def test_right_key_succeeds_both_ways_and_session_keys_agree():
    key = generate_key()
    root, worker, wire = run_handshake(key, key)
    assert root.verified and worker.verified
    assert root.peer_id == "w1" and worker.peer_id == "root"
    assert root.session_key() == worker.session_key()
    assert len(root.session_key()) == 32
    assert root.session_key("root->worker") != root.session_key("worker->root")
    # A new session (new nonces) gives a new session key.
    root2, worker2, _ = run_handshake(key, key)
    assert root2.session_key() != root.session_key()
    assert root2.session_key() == worker2.session_key()


def test_proofs_match_an_independent_hmac():
    key, n_i, n_r = bytes(range(32)), b"\x01" * 32, b"\x02" * 32
    root = Handshake(key, INITIATOR, "lab", "root", nonce=n_i)
    worker = Handshake(key, RESPONDER, "lab", "w1", nonce=n_r)
    root.meet("w1", n_r)
    worker.meet("root", n_i)

    def lp(b):
        return len(b).to_bytes(8, "big") + b

    def oracle(role, own, peer):
        msg = b"".join(lp(x) for x in (b"dllama-node auth v1", role, own, peer, b"lab",
                                       b"root", b"w1"))
        return hmac.new(key, msg, hashlib.sha256).digest()

    assert root.proof() == oracle(b"initiator", n_i, n_r)
    assert worker.proof() == oracle(b"responder", n_r, n_i)
    worker.verify(root.proof())
    root.verify(worker.proof())


def test_wrong_key_fails_on_the_root_with_the_workers_name():
    root_key, worker_key = generate_key(), generate_key()
    with pytest.raises(AuthenticationError) as err:
        run_handshake(root_key, worker_key)
    msg = str(err.value)
    assert "cluster key mismatch" in msg and "w1" in msg and WORKER_ADDR in msg
    assert key_id(root_key) in msg
    assert isinstance(err.value, ClusterError)
    for k in (root_key, worker_key):
        assert k.hex() not in msg and k.hex().upper() not in msg


def test_wrong_key_fails_on_the_worker_with_the_roots_name():
    """A root without the key cannot make the worker accept it, even when it lets the
    worker's proof through unchecked (the root side here skips verify)."""
    worker_key, root_key = generate_key(), generate_key()
    root = Handshake(root_key, INITIATOR, "lab", "root")
    worker = Handshake(worker_key, RESPONDER, "lab", "w1")
    welcome = worker.answer(root.offer(), ROOT_ADDR)
    root.meet(welcome["node_id"], bytes.fromhex(welcome["nonce"]), welcome["cluster"])
    with pytest.raises(AuthenticationError) as err:
        worker.finish({"proof": root.proof().hex()})
    msg = str(err.value)
    assert "cluster key mismatch" in msg and "node root" in msg and ROOT_ADDR in msg
    assert key_id(worker_key) in msg and worker_key.hex() not in msg and root_key.hex() not in msg
    assert not worker.verified
    with pytest.raises(ClusterError, match="no session key"):
        worker.session_key()


def test_replayed_worker_response_fails_with_a_new_root_nonce():
    key = generate_key()
    recorded = {}
    run_handshake(key, key, tamper=lambda n, m: recorded.setdefault(n, m))
    # An impostor without the key replays the recorded WELCOME to a new root session.
    root = Handshake(key, INITIATOR, "lab", "root")
    root.offer()
    with pytest.raises(AuthenticationError, match="cluster key mismatch"):
        root.confirm(recorded["WELCOME"], WORKER_ADDR)


def test_replayed_root_proof_fails_with_a_new_worker_nonce():
    key = generate_key()
    recorded = {}
    run_handshake(key, key, tamper=lambda n, m: recorded.setdefault(n, m))
    worker = Handshake(key, RESPONDER, "lab", "w1")
    worker.answer(recorded["HELLO"], ROOT_ADDR)              # same HELLO, fresh worker nonce
    with pytest.raises(AuthenticationError, match="cluster key mismatch"):
        worker.finish(recorded["AUTH"])


def test_reflected_proof_fails():
    """The worker's own proof sent back to it (the role in the MAC tells them apart)."""
    key = generate_key()
    root = Handshake(key, INITIATOR, "lab", "root")
    worker = Handshake(key, RESPONDER, "lab", "w1")
    welcome = worker.answer(root.offer(), ROOT_ADDR)
    with pytest.raises(AuthenticationError, match="cluster key mismatch"):
        worker.finish({"proof": welcome["proof"]})


def test_reflected_nonce_is_refused():
    key = generate_key()
    worker = Handshake(key, RESPONDER, "lab", "w1")
    with pytest.raises(AuthenticationError, match="own nonce"):
        worker.answer({"node_id": "root", "cluster": "lab", "nonce": worker.nonce.hex()},
                      ROOT_ADDR)


@pytest.mark.parametrize("message,field", [("HELLO", "nonce"), ("WELCOME", "nonce"),
                                           ("HELLO", "node_id"), ("WELCOME", "node_id"),
                                           ("WELCOME", "proof"), ("AUTH", "proof")])
def test_tampered_field_fails(message, field):
    key = generate_key()

    def tamper(name, msg):
        if name == message:
            if field == "node_id":
                msg[field] = msg[field] + "x"
            else:
                raw = bytearray(bytes.fromhex(msg[field]))
                raw[5] ^= 0x01
                msg[field] = raw.hex()
        return msg

    with pytest.raises(AuthenticationError, match="cluster key mismatch"):
        run_handshake(key, key, tamper=tamper)


def test_other_cluster_name_is_refused_by_name():
    key = generate_key()
    with pytest.raises(AuthenticationError, match="cluster name mismatch.*'attic'.*'lab'"):
        run_handshake(key, key, cluster="lab", root_cluster="attic")


@pytest.mark.parametrize("msg,match", [
    ({"node_id": "root", "cluster": "lab"}, "no 'nonce' field"),
    ({"node_id": "root", "cluster": "lab", "nonce": "zz"}, "not hex"),
    ({"node_id": "root", "cluster": "lab", "nonce": "ab" * 31}, "31 bytes, expected 32"),
    ({"node_id": "root", "nonce": "ab" * 32}, "names no cluster"),
    ({"cluster": "lab", "nonce": "ab" * 32}, "no node id"),
    (["not", "a", "dict"], "not a JSON object"),
])
def test_malformed_hello_is_a_protocol_error_naming_the_peer(msg, match):
    worker = Handshake(generate_key(), RESPONDER, "lab", "w1")
    with pytest.raises(ProtocolError, match=match) as err:
        worker.answer(msg, ROOT_ADDR)
    assert ROOT_ADDR in str(err.value)


def test_short_or_missing_proof_is_refused():
    key = generate_key()
    root = Handshake(key, INITIATOR, "lab", "root")
    worker = Handshake(key, RESPONDER, "lab", "w1")
    worker.answer(root.offer(), ROOT_ADDR)
    with pytest.raises(ProtocolError, match="16 bytes, expected 32"):
        worker.finish({"proof": "00" * 16})
    with pytest.raises(ProtocolError, match="no 'proof' field"):
        worker.finish({})
    with pytest.raises(AuthenticationError):
        worker.verify(b"")


def test_one_handshake_per_connection():
    key = generate_key()
    root, worker, _ = run_handshake(key, key)
    with pytest.raises(ProtocolError, match="second handshake"):
        worker.meet("root", os.urandom(NONCE_BYTES))


def test_key_never_on_the_wire_nor_in_reprs():
    key = generate_key()
    root, worker, wire = run_handshake(key, key)
    data = b"".join(wire)
    for form in (key, key.hex().encode(), key.hex().upper().encode()):
        assert form not in data
    for text in (repr(root), repr(worker), str(vars(root).keys())):
        assert key.hex() not in text
    # The wire carries nonces and proofs only: every hex field is one of them.
    fields = [json.loads(w) for w in wire]
    hexes = {v for f in fields for k, v in f.items() if k in ("nonce", "proof")}
    assert hexes == {root.nonce.hex(), worker.nonce.hex(), root.proof().hex(),
                     worker.proof().hex()}


def test_make_proof_rejects_an_unknown_role():
    with pytest.raises(ValueError, match="role"):
        make_proof(bytes(32), "root", bytes(32), bytes(32), "lab", "a", "b")
    with pytest.raises(ValueError, match="31 bytes, expected 32"):
        Handshake(bytes(31), INITIATOR, "lab", "a")


# ---- HKDF against RFC 5869 -----------------------------------------------------------
def test_hkdf_rfc5869_vectors():
    ikm = bytes([0x0b] * 22)
    # A.1: basic case.
    assert hkdf_sha256(ikm, bytes(range(13)), bytes(range(0xf0, 0xfa)), 42).hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
    # A.3: empty salt and info.
    assert hkdf_sha256(ikm, b"", b"", 42).hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8")
    # A.2: long inputs, 82 bytes of output (three expand blocks).
    ikm2, salt2, info2 = bytes(range(0x50)), bytes(range(0x60, 0xb0)), bytes(range(0xb0, 0x100))
    assert hkdf_sha256(ikm2, salt2, info2, 82).hex() == (
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
        "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
        "cc30c58179ec3e87c14c01d5c1f3434f1d87")
    with pytest.raises(ValueError):
        hkdf_sha256(ikm, b"", b"", 0)


# ---- key files -----------------------------------------------------------------------
def test_generate_write_read_round_trip(tmp_path):
    key = generate_key()
    assert len(key) == KEY_BYTES and generate_key() != key
    path = tmp_path / "cluster.key"
    for umask in (0o000, 0o277):                    # the mode must not depend on the umask
        old_umask = os.umask(umask)
        try:
            write_key(path, key)
        finally:
            os.umask(old_umask)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, oct(umask)
    assert path.read_text() == key.hex() + "\n"
    assert read_key(path) == key
    # Replacing is atomic and leaves no temporary file behind.
    key2 = generate_key()
    write_key(str(path), key2)
    assert read_key(path) == key2
    assert sorted(os.listdir(tmp_path)) == ["cluster.key"]


def test_read_key_accepts_upper_case_and_whitespace(tmp_path):
    key = generate_key()
    path = tmp_path / "k"
    path.write_text("  " + key.hex().upper() + "\r\n\n")
    os.chmod(path, 0o600)
    assert read_key(path) == key


def test_read_key_missing(tmp_path):
    with pytest.raises(ClusterKeyError, match=r"cluster key file .*nope\.key does not exist"):
        read_key(tmp_path / "nope.key")


def test_read_key_wrong_mode_warns_naming_the_file(tmp_path, caplog):
    key = generate_key()
    path = tmp_path / "cluster.key"
    write_key(path, key)
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="dllama_node.cluster.auth"):
        assert read_key(path) == key
    text = caplog.text
    assert str(path) in text and "0644" in text and "chmod 600" in text
    assert key.hex() not in text


@pytest.mark.parametrize("content,match", [
    ("", "is empty"),
    ("\n  \n", "is empty"),
    ("ab" * 31 + "\n", "expected 64 hex digits .32 bytes., found 62 characters"),
    ("ab" * 33, "found 66 characters"),
    ("ab" * 20 + "g" + "b" * 23, "character 41 of 64 is not a hex digit"),
    ("ab" * 16 + " " + "ab" * 16, "found 65 characters"),
])
def test_read_key_malformed_names_file_and_problem(tmp_path, content, match):
    path = tmp_path / "bad.key"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(ClusterKeyError, match=match) as err:
        read_key(path)
    assert str(path) in str(err.value)
    if len(content) > 10:
        assert content.strip()[:10] not in str(err.value)       # no key material echoed


def test_read_key_binary_and_huge_and_directory(tmp_path):
    path = tmp_path / "bin.key"
    path.write_bytes(bytes(range(256)) * 2)
    os.chmod(path, 0o600)
    with pytest.raises(ClusterKeyError, match="found|not a hex digit"):
        read_key(path)
    big = tmp_path / "big.key"
    big.write_bytes(b"a" * 10000)
    with pytest.raises(ClusterKeyError, match="10000 bytes"):
        read_key(big)
    with pytest.raises(ClusterKeyError, match="not a regular file"):
        read_key(tmp_path)


def test_read_key_unreadable(tmp_path):
    """A key file of root's, mode 0600, read by another user (as root: with the effective
    ids of nobody, in this process: no child has to import the package from a checkout it
    may not be able to read)."""
    folder = tempfile.mkdtemp()
    try:
        os.chmod(folder, 0o755)
        path = os.path.join(folder, "cluster.key")
        write_key(path, generate_key())
        if os.geteuid() != 0:
            os.chmod(path, 0)
            with pytest.raises(ClusterKeyError, match="not readable by this user"):
                read_key(path)
            return
        with effective_user(), pytest.raises(ClusterKeyError) as refused:
            read_key(path)
        assert os.geteuid() == 0
        assert f"not readable by this user (uid {NOBODY_UID})" in str(refused.value)
        assert path in str(refused.value)
    finally:
        shutil.rmtree(folder)


def test_write_key_errors(tmp_path):
    with pytest.raises(ValueError, match="16 bytes, expected 32"):
        write_key(tmp_path / "k", bytes(16))
    with pytest.raises(TypeError):
        write_key(tmp_path / "k", "00" * 32)
    with pytest.raises(ClusterKeyError, match="cannot write cluster key file .*missing"):
        write_key(tmp_path / "missing" / "k", generate_key())


def test_key_id_is_a_fingerprint_not_the_key():
    key = generate_key()
    assert key_id(key) == key_id(bytes(key)) and len(key_id(key)) == 12
    assert key_id(key) not in key.hex()
    assert key_id(generate_key()) != key_id(key)
