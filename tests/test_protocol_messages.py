"""The control messages of cluster/protocol.py: each round-trips through its JSON payload
unchanged, and a missing, mistyped or out-of-range field is refused on receipt with a
ProtocolError that names the peer, the message, the field and the value."""
from __future__ import annotations

import dataclasses
import json
import socket

import pytest

from dllama_node.cluster import protocol as p
from dllama_node.cluster.protocol import (Assign, Auth, Connection, ErrorReport, Hello, Kind,
                                          Loaded, ManifestText, MeshAnswer, MeshPeer,
                                          MeshRequest, Need, Rejection, StatsReport,
                                          StatsRequest, Welcome)
from dllama_node.common.errors import ClusterError, ProtocolError
from dllama_node.model.config import ModelConfig
from dllama_node.model.tensors import SliceSpec

NONCE = "ab" * 32
CONFIG = ModelConfig(arch="llama", dim=64, hidden_dim=172, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=16, vocab_size=300, seq_len=128, norm_eps=1e-5, rope_theta=10000.0,
                     tied_embeddings=True)
SPEC = SliceSpec(q_heads=(0, 2), kv_heads=(0, 1), ffn_rows=(0, 96), vocab_rows=(0, 160))
ASSIGN = Assign(model_path=None, model_identity="f" * 32, model_size=5 << 32, config=CONFIG,
                slice=SPEC, seq_len=128, batch=16, planned_bytes=6 << 32, threads=2,
                wire="q8_0", load_id="0123abcd")

EXAMPLES = [
    Hello(version=3, node_id="root", cluster="lab", nonce=NONCE),
    Hello(version=3, node_id="n1", cluster="lab", nonce=NONCE, mesh="s" * 32, index=2),
    Welcome(version=3, pid=4242, node_id="n1", cluster="lab", nonce=NONCE, proof="cd" * 32),
    Auth(proof="cd" * 32),
    ASSIGN,
    dataclasses.replace(ASSIGN, model_path="/models/m.gguf"),
    Loaded(node_id="n1", source="stream", streamed_bytes=5 << 32, weights_bytes=5 << 32,
           kv_cache_bytes=1 << 20, rss_bytes=6 << 32, load_s=1.25),
    ErrorReport("node n1: out of memory"),
    ErrorReport("rejects its slice", reject=Rejection("n1", 1 << 30, 2 << 30)),
    ErrorReport("connection closed", failed_node="n2", position=17, layer=5, phase="ffn"),
    Need("manifest"),
    Need("tensors", ("blk.0.attn_q.weight", "output.weight")),
    ManifestText('{"format": 1}'),
    StatsRequest(reset=True),
    StatsReport(sync_s=0.5, step_s=2.0, compute_s=1.5, steps=128, bytes_sent=1 << 33,
                bytes_received=7),
    MeshRequest("s" * 32, 1, (MeshPeer(1, "n1", "n1", "127.0.0.1", 7321),
                              MeshPeer(2, "n2", "n2-auth", "10.0.0.2", 65535)), spin_us=150),
    MeshAnswer(links=2),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_json(message):
    payload = json.loads(json.dumps(message.to_payload()))
    assert type(message).from_payload(payload, "peer:1") == message


def test_every_message_kind_with_json_has_a_declared_payload():
    declared = {m.KIND for m in EXAMPLES}
    binary_or_empty = {Kind.FORWARD, Kind.PART, Kind.LOGITS, Kind.CHUNK, Kind.CHUNK_END,
                       Kind.BYE}
    assert declared | binary_or_empty == set(Kind)


def test_the_wire_form_is_the_one_before_the_messages_were_declared():
    """Protocol version 3 unchanged: the same keys, optional ones left out as before."""
    assign = ASSIGN.to_payload()
    assert assign["model_path"] is None and "rope_scaling" not in assign["config"]
    assert assign["slice"] == {"q_heads": [0, 2], "kv_heads": [0, 1], "ffn_rows": [0, 96],
                               "vocab_rows": [0, 160]}
    assert Hello(version=3, node_id="r", cluster="c", nonce=NONCE).to_payload() == {
        "version": 3, "node_id": "r", "cluster": "c", "nonce": NONCE}
    assert ErrorReport("m").to_payload() == {"message": "m"}
    assert Need("manifest").to_payload() == {"what": "manifest"}
    assert MeshRequest("s", 1, (MeshPeer(1, "a", "b", "h", 9),)).to_payload() == {
        "session": "s", "index": 1, "spin_us": 0,
        "peers": [{"index": 1, "node_id": "a", "auth_id": "b", "host": "h", "port": 9}]}


def _with(message, path, value):
    """message's payload with the field at `path` (dotted, [i] for list items) set to
    value, or removed when value is DELETE."""
    payload = json.loads(json.dumps(message.to_payload()))
    *outer, last = [int(k) if k.isdigit() else k
                    for k in path.replace("[", ".").replace("]", "").split(".")]
    target = payload
    for key in outer:
        target = target[key]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return payload


DELETE = object()
LOADED, MESH, STATS = EXAMPLES[6], EXAMPLES[15], EXAMPLES[14]
MALFORMED = [
    # (message, field path, bad value, what the error says)
    (LOADED, "weights_bytes", -5, "LOADED field 'weights_bytes' is -5, expected an integer in "
                                  "[0, 2**63 - 1]"),
    (LOADED, "rss_bytes", 1 << 63, "LOADED field 'rss_bytes' is 9223372036854775808"),
    (LOADED, "kv_cache_bytes", 1.5, "LOADED field 'kv_cache_bytes' is 1.5, expected an integer"),
    (LOADED, "streamed_bytes", True, "LOADED field 'streamed_bytes' is True"),
    (LOADED, "source", "floppy", "LOADED field 'source' is 'floppy', expected 'file' or "
                                 "'cache' or 'stream'"),
    (LOADED, "load_s", "fast", "LOADED field 'load_s' is 'fast', expected a number"),
    (LOADED, "load_s", -1, "LOADED field 'load_s' is -1"),
    (LOADED, "node_id", DELETE, "LOADED has no field 'node_id'"),
    (ASSIGN, "wire", "f16", "ASSIGN field 'wire' is 'f16', expected 'q8_0' or 'f32'"),
    (ASSIGN, "batch", 0, "ASSIGN field 'batch' is 0, expected an integer in [1, 2**63 - 1]"),
    (ASSIGN, "seq_len", "128", "ASSIGN field 'seq_len' is '128'"),
    (ASSIGN, "threads", None, "ASSIGN field 'threads' is None"),
    (ASSIGN, "model_size", -1, "ASSIGN field 'model_size' is -1"),
    (ASSIGN, "planned_bytes", 2.0 ** 70, "ASSIGN field 'planned_bytes' is 1.1805916207174113e+21"),
    (ASSIGN, "model_path", 7, "ASSIGN field 'model_path' is 7, expected a string"),
    (ASSIGN, "slice.kv_heads", [2, 1], "ASSIGN field 'slice.kv_heads' is [2, 1], expected "
                                      "[start, stop] with 0 <= start <= stop"),
    (ASSIGN, "slice.ffn_rows", [0, "96"], "ASSIGN field 'slice.ffn_rows' is [0, '96']"),
    (ASSIGN, "slice.vocab_rows", DELETE, "ASSIGN has no field 'slice.vocab_rows'"),
    (ASSIGN, "slice", [], "ASSIGN field 'slice' is [], expected a JSON object"),
    (ASSIGN, "config.dim", "64", "ASSIGN field 'config.dim' is '64', expected an integer"),
    (ASSIGN, "config.n_layers", DELETE, "ASSIGN has no field 'config.n_layers'"),
    (ASSIGN, "load_id", DELETE, "ASSIGN has no field 'load_id'"),
    (EXAMPLES[0], "nonce", 12, "HELLO field 'nonce' is 12, expected a string"),
    (EXAMPLES[1], "index", 0, "HELLO field 'index' is 0, expected an integer in [1, "),
    (EXAMPLES[2], "pid", -1, "WELCOME field 'pid' is -1"),
    (EXAMPLES[3], "proof", DELETE, "AUTH has no field 'proof'"),
    (EXAMPLES[8], "reject.needed_bytes", -2, "ERROR field 'reject.needed_bytes' is -2"),
    (EXAMPLES[9], "layer", -1, "ERROR field 'layer' is -1"),
    (EXAMPLES[9], "message", DELETE, "ERROR has no field 'message'"),
    (EXAMPLES[11], "what", "weights", "NEED field 'what' is 'weights', expected 'manifest' or "
                                      "'tensors'"),
    (EXAMPLES[11], "names", "output.weight", "NEED field 'names' is 'output.weight', expected "
                                             "a JSON array"),
    (EXAMPLES[11], "names[1]", 3, "NEED field 'names[1]' is 3, expected a string"),
    (EXAMPLES[12], "manifest", {"format": 1}, "MANIFEST field 'manifest' is {'format': 1}"),
    (EXAMPLES[13], "reset", "yes", "STATS field 'reset' is 'yes', expected true or false"),
    (STATS, "bytes_sent", -1, "STATS field 'bytes_sent' is -1"),
    (STATS, "sync_s", float("nan"), "STATS field 'sync_s' is nan, expected a number"),
    (MESH, "peers[1].port", 70000, "MESH field 'peers[1].port' is 70000, expected an integer "
                                   "in [1, 65535]"),
    (MESH, "peers[0].host", DELETE, "MESH has no field 'peers[0].host'"),
    (MESH, "peers", {}, "MESH field 'peers' is {}, expected a JSON array"),
    (MESH, "spin_us", -150, "MESH field 'spin_us' is -150"),
    (EXAMPLES[16], "links", "2", "MESH field 'links' is '2'"),
]


@pytest.mark.parametrize("message, path, value, said", MALFORMED,
                         ids=[f"{m.KIND.name}-{path}-{v!r}"[:60] for m, path, v, _ in MALFORMED])
def test_a_malformed_field_is_refused_naming_the_message_field_and_value(message, path, value,
                                                                         said):
    with pytest.raises(ProtocolError) as refused:
        type(message).from_payload(_with(message, path, value), "10.0.0.2:7321")
    assert str(refused.value).startswith("node 10.0.0.2:7321: ")
    assert said in str(refused.value)


def test_a_payload_that_is_not_an_object_is_refused():
    with pytest.raises(ProtocolError, match=r"LOADED field '\(payload\)' is \[1, 2\], expected "
                                            "a JSON object"):
        Loaded.from_payload([1, 2], "peer:1")


def test_a_long_refused_value_is_shortened_in_the_error():
    with pytest.raises(ProtocolError) as refused:
        Auth.from_payload({"proof": ["x" * 1000]}, "peer:1")
    assert len(str(refused.value)) < 200 and str(refused.value).endswith("expected a string")


def test_fields_a_newer_peer_adds_are_ignored():
    payload = dict(MeshAnswer(3).to_payload(), latency_us=12)
    assert MeshAnswer.from_payload(payload) == MeshAnswer(3)


def test_the_load_key_ignores_what_does_not_change_the_loaded_slice():
    """A worker keeps its slice for a new root with the same plan (another load id, a
    model path or none); any change to what is loaded gives another key."""
    same = dataclasses.replace(ASSIGN, load_id="ffff0000", model_path="/m.gguf",
                               planned_bytes=1)
    assert same.load_key == ASSIGN.load_key and hash(same.load_key) == hash(ASSIGN.load_key)
    for change in ({"wire": "f32"}, {"seq_len": 64}, {"batch": 8}, {"threads": 1},
                   {"model_size": 1}, {"model_identity": "e" * 32},
                   {"slice": SliceSpec((0, 2), (0, 1), (0, 96), (0, 150))}):
        assert dataclasses.replace(ASSIGN, **change).load_key != ASSIGN.load_key


@pytest.fixture
def pair():
    with socket.create_server(("127.0.0.1", 0)) as listener:     # TCP, as Connection wants
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    # each side's Connection names its peer: the receiver's names the sender
    ca, cb = Connection(a, "receiver:2", timeout_s=2.0), Connection(b, "sender:1", timeout_s=2.0)
    yield ca, cb
    ca.close()
    cb.close()


def test_messages_cross_a_connection_checked(pair):
    sender, receiver = pair
    sender.send_message(ASSIGN)
    assert receiver.recv_message(Assign) == ASSIGN
    sender.send(Kind.LOADED, json.dumps(_with(LOADED, "weights_bytes", -1)).encode())
    with pytest.raises(ProtocolError, match="node sender:1: LOADED field 'weights_bytes' is -1"):
        receiver.recv_message(Loaded)


def test_an_error_in_place_of_the_message_is_raised_with_its_text(pair):
    sender, receiver = pair
    sender.send_message(ErrorReport("node n1 could not join the mesh: refused"))
    with pytest.raises(ClusterError, match="node sender:1: node n1 could not join the mesh"):
        receiver.recv_message(MeshAnswer)
    sender.send_message(StatsRequest())
    with pytest.raises(ProtocolError, match="expected MESH .*got STATS"):
        receiver.recv_message(MeshAnswer)


def test_the_protocol_version_is_unchanged():
    assert p.PROTOCOL_VERSION == 3
