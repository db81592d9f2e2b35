"""Discovery without sockets: the TXT and JSON codecs (with python-zeroconf's own TXT
encoder and parser as the oracle), heartbeat datagrams, static-peer parsing, and the
PeerTable with a fake clock."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf import ServiceInfo

from dllama_node.common.errors import ProtocolError, UsageError
from dllama_node.discovery.heartbeat import (BEAT, GOODBYE, HELLO, MAGIC, decode_datagram,
                                             encode_datagram)
from dllama_node.discovery.mdns import SERVICE_TYPE, pick_address
from dllama_node.discovery.peers import CANDIDATE, GONE, LIVE, PeerTable
from dllama_node.discovery.static import StaticPeers, parse_static_peer
from dllama_node.discovery.txt import (TXT_BUDGET_BYTES, TXT_STRING_MAX_BYTES, NodeAdvert,
                                       decode_txt, encode_txt, split_txt, txt_models_complete,
                                       txt_pairs)


def advert(node_id: str = "n1", **kw) -> NodeAdvert:
    kw.setdefault("cluster", "home")
    kw.setdefault("port", 7000)
    kw.setdefault("heartbeat_port", 7001)
    kw.setdefault("instance", "a1")
    return NodeAdvert(node_id, **kw)


FULL = advert("pi4-b", address="192.168.1.23", protocol_version=3,
              available_ram_bytes=3_700_000_000_123, free_swap_bytes=(1 << 40) + 7,
              memlock_limit_bytes=8 << 20, cores=4, speed=12.375,
              models=("llama-3.2-1b-q40", "Ünïcode módel ✓"), coordinator_only=True,
              never_root=True, term=17, root_id="pi5-a", instance="0123456789abcdef", revision=42)


# --- TXT ------------------------------------------------------------------------------------------

def test_txt_round_trip_every_field():
    assert decode_txt(encode_txt(FULL)) == FULL
    minimal = NodeAdvert("x", "c", 1, 65535)
    assert decode_txt(encode_txt(minimal)) == minimal


def test_txt_matches_zeroconf_encoder_and_parser():
    """Our raw TXT bytes are what zeroconf builds from the same key/value dict, and
    zeroconf's parser reads back the same pairs as ours."""
    text = encode_txt(FULL)
    pairs = txt_pairs(text)
    info = ServiceInfo(SERVICE_TYPE, "pi4-b." + SERVICE_TYPE, port=7000, properties=dict(pairs))
    assert info.text == text
    parsed = ServiceInfo(SERVICE_TYPE, "pi4-b." + SERVICE_TYPE, port=7000, properties=text)
    assert {k.decode(): v.decode() for k, v in parsed.properties.items()} == pairs
    assert pairs["ram"] == "3700000000123" and pairs["swp"] == str((1 << 40) + 7)
    assert pairs["co"] == "1" and pairs["t"] == "17" and pairs["mn"] == "2"


def test_txt_limits_every_string_and_the_budget():
    long_models = tuple(f"{i:03d}-" + "m" * 196 for i in range(20))     # 200 bytes each
    a = advert("n" * 55, cluster="c" * 63, models=long_models, root_id="r" * 55,
               instance="f" * 32, address="h" * 200)
    text = encode_txt(a)
    assert len(text) <= TXT_BUDGET_BYTES
    assert all(len(s) <= TXT_STRING_MAX_BYTES for s in split_txt(text))
    back = decode_txt(text)
    assert 0 < len(back.models) < len(long_models)
    assert back.models == long_models[:len(back.models)]
    assert back.replace(models=long_models) == a
    assert txt_models_complete(text) is False
    assert txt_models_complete(encode_txt(FULL)) is True


@pytest.mark.parametrize("field,value", [
    ("node_id", "n" * 56), ("node_id", "Pi4"), ("node_id", "-a"), ("node_id", "a b"),
    ("node_id", ""), ("cluster", "c" * 64), ("cluster", "a=b"), ("port", 0), ("port", 65536),
    ("heartbeat_port", 0), ("available_ram_bytes", -1), ("memlock_limit_bytes", -2),
    ("cores", 0), ("speed", float("nan")), ("speed", float("inf")), ("speed", -1.0),
    ("term", 1 << 63), ("term", (1 << 62) + 1),
    ("models", ("m" * 201,)), ("models", ("",)), ("models", ("\ud800",)),
    ("root_id", "Bad"),
    ("instance", "XYZ"), ("address", "a b"),
])
def test_advert_rejects_out_of_range_fields(field, value):
    with pytest.raises(UsageError, match=field):
        advert(**{field: value}) if field != "node_id" else advert(value)


def _txt(*strings: bytes) -> bytes:
    return b"".join(bytes((len(s),)) + s for s in strings)


BASE = (b"v=1", b"id=n2", b"cl=home", b"p=7000", b"hp=7001")


def test_txt_unknown_keys_ignored_first_duplicate_wins_keys_case_insensitive():
    a = decode_txt(_txt(*BASE, b"future=xyz", b"flag", b"=noval", b"RAM=5", b"ram=9", b"c=2"))
    assert a.node_id == "n2" and a.available_ram_bytes == 5 and a.cores == 2
    assert a.models == () and a.term == 0 and a.root_id == ""


@pytest.mark.parametrize("text,match", [
    (_txt(*BASE[1:]), "key v"),
    (_txt(b"v=2", *BASE[1:]), "format version 2"),
    (_txt(b"v=1", b"cl=home", b"p=7000", b"hp=7001"), "key id"),
    (_txt(*BASE[:4]), "key hp"),
    (_txt(*BASE) + b"\x09short", "claims 9 bytes"),
    (_txt(*BASE, b"ram=\xff\xfe"), "not UTF-8"),
    (_txt(*BASE, b"ram=12x"), "ram='12x'"),
    (_txt(*BASE, b"ram=" + b"9" * 20), "decimal integer"),
    (_txt(*BASE, b"ram=-5"), "available_ram_bytes"),
    (_txt(*BASE, b"co=2"), "expected 0 or 1"),
    (_txt(*BASE, b"s=fast"), "expected a number"),
    (_txt(*BASE, b"s=nan"), "speed"),
    (_txt(b"v=1", b"id=UPPER", *BASE[2:]), "node_id"),
    (_txt(b"v=1", b"id=n2", b"cl=home", b"p=0", b"hp=7001"), "port"),
])
def test_txt_malformed_records_raise_protocol_error_naming_the_problem(text, match):
    with pytest.raises(ProtocolError, match=match):
        decode_txt(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_txt_garbage_never_crashes(data):
    try:
        decode_txt(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["v", "id", "cl", "p", "hp", "ram", "c", "s", "co",
                                           "mn", "m0", "m1", "t", "r", "rv", "i"]),
                          st.text(max_size=30)), max_size=20))
def test_txt_garbage_values_never_crash(pairs):
    strings = [f"{k}={v}".encode()[:255] for k, v in pairs]
    try:
        decode_txt(_txt(*strings))
    except ProtocolError:
        pass


node_ids = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,53}[a-z0-9])?", fullmatch=True)
adverts = st.builds(
    NodeAdvert, node_id=node_ids, cluster=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}",
                                                        fullmatch=True),
    port=st.integers(1, 65535), heartbeat_port=st.integers(1, 65535),
    available_ram_bytes=st.integers(0, 2 ** 63 - 1), free_swap_bytes=st.integers(0, 2 ** 40),
    memlock_limit_bytes=st.integers(-1, 2 ** 40), cores=st.integers(1, 256),
    speed=st.floats(0, 1e12, allow_nan=False, allow_infinity=False),
    models=st.lists(st.text(st.characters(blacklist_characters="\x00",
                                          blacklist_categories=("Cs",)), min_size=1,
                            max_size=60), max_size=30),
    coordinator_only=st.booleans(), never_root=st.booleans(), term=st.integers(0, 2 ** 62),
    root_id=st.one_of(st.just(""), node_ids), instance=st.from_regex(r"[0-9a-f]{0,32}",
                                                                     fullmatch=True),
    revision=st.integers(0, 2 ** 40))


@settings(max_examples=200, deadline=None)
@given(adverts)
def test_round_trips_property(a):
    text = encode_txt(a)
    assert len(text) <= TXT_BUDGET_BYTES
    back = decode_txt(text)
    assert back.models == a.models[:len(back.models)]
    assert back.replace(models=a.models) == a
    assert txt_models_complete(text) == (back.models == a.models)
    assert NodeAdvert.from_dict(json.loads(json.dumps(a.to_dict()))) == a


# --- JSON adverts and heartbeat datagrams ---------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    ({"port": "7000"}, "'port'"), ({"cores": True}, "'cores'"), ({"never_root": 1}, "never_root"),
    ({"models": "abc"}, "models"), ({"models": [1]}, "models"), ({"speed": "1"}, "speed"),
    ({"port": 0}, "port"), ({"node_id": None}, "node_id"),
])
def test_advert_from_dict_checks_types(change, match):
    d = FULL.to_dict()
    d.update(change)
    with pytest.raises(ProtocolError, match=match):
        NodeAdvert.from_dict(d)


def test_advert_from_dict_missing_and_unknown_fields():
    d = FULL.to_dict()
    d["added_in_a_later_version"] = [1, 2]
    assert NodeAdvert.from_dict(d) == FULL
    del d["heartbeat_port"]
    with pytest.raises(ProtocolError, match="heartbeat_port"):
        NodeAdvert.from_dict(d)
    with pytest.raises(ProtocolError, match="JSON object"):
        NodeAdvert.from_dict([1])


def test_advert_to_capacity_feeds_the_planner():
    cap = FULL.to_capacity()
    assert (cap.node_id, cap.available_ram_bytes, cap.free_swap_bytes, cap.cores, cap.speed,
            cap.coordinator_only) == ("pi4-b", FULL.available_ram_bytes, FULL.free_swap_bytes,
                                      4, 12.375, True)


def test_datagram_round_trip_and_layout():
    for kind in (HELLO, BEAT, GOODBYE):
        data = encode_datagram(kind, FULL, [("10.0.0.2", 7001), ("10.0.0.3", 9)])
        assert data[:4] == MAGIC and data[4] == 1 and data[5:6] == kind
        assert json.loads(data[6:])["advert"]["node_id"] == "pi4-b"
        assert decode_datagram(data) == (kind, FULL, [("10.0.0.2", 7001), ("10.0.0.3", 9)])


@pytest.mark.parametrize("data,match", [
    (b"", "magic"), (b"HTTP/1.1 200 OK", "magic"), (MAGIC + b"\x02B{}", "version 2"),
    (MAGIC + b"\x01Z{}", "kind"), (MAGIC + b"\x01B{", "JSON"), (MAGIC + b"\x01B[]", "object"),
    (MAGIC + b"\x01B\xff", "UTF-8"), (MAGIC + b"\x01B{}", "advert"),
    (MAGIC + b"\x01B" + json.dumps({"advert": FULL.to_dict(), "peers": [["h", 0]]}).encode(),
     "peers"),
    (MAGIC + b"\x01B" + json.dumps({"advert": FULL.to_dict(), "peers": 5}).encode(), "peers"),
    (MAGIC + b"\x01B" + b"[" * 60000, "nested too deep"),
    (MAGIC + b"\x01B" + b'{"advert": ' + b"9" * 5000 + b"}", "JSON"),
    # a term past TERM_MAX (2**63-1 once made the next election overflow and both daemons exit)
    (MAGIC + b"\x01B" + json.dumps({"advert": dict(FULL.to_dict(), term=2 ** 63 - 1)}).encode(),
     r"term.*2\*\*62"),
])
def test_datagram_garbage_raises_protocol_error(data, match):
    with pytest.raises(ProtocolError, match=match):
        decode_datagram(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_datagram_garbage_never_crashes(tail):
    for data in (tail, MAGIC + b"\x01B" + tail):
        try:
            decode_datagram(data)
        except ProtocolError:
            pass


def test_datagram_size_limit_names_the_node():
    big = advert("big", models=tuple(f"{i}-" + "m" * 190 for i in range(400)))
    with pytest.raises(ValueError, match="node big: .* bytes"):
        encode_datagram(BEAT, big)


# --- static peers ---------------------------------------------------------------------------------

def test_parse_static_peer():
    assert parse_static_peer("10.0.0.2:7001") == ("10.0.0.2", 7001)
    assert parse_static_peer(" pi4.lan:65535 ") == ("pi4.lan", 65535)
    for bad, match in [("10.0.0.2", "HOST:PORT"), (":7001", "HOST:PORT"), ("h:", "HOST:PORT"),
                       ("h:0", "port"), ("h:65536", "port"), ("h:x1", "port"),
                       ("[::1]:7001", "IPv6"), ("fe80::1:7001", "IPv6"), ("a b:1", "host")]:
        with pytest.raises(UsageError, match=match):
            parse_static_peer(bad)


def test_static_targets_skip_live_and_own_and_forget_learnt():
    sp = StaticPeers([("10.0.0.2", 7001), ("10.0.0.3", 7001), ("10.0.0.2", 7001)],
                     learned_ttl_s=10)

    def targets(now, skip=()):
        return asyncio.run(sp.targets(now, set(skip)))

    assert targets(0) == [("10.0.0.2", 7001), ("10.0.0.3", 7001)]
    assert targets(0, [("10.0.0.2", 7001)]) == [("10.0.0.3", 7001)]
    sp.is_own(("10.0.0.3", 7001))
    assert targets(0) == [("10.0.0.2", 7001)]
    sp.learn([("10.0.0.4", 7001), ("10.0.0.5", 7001), ("10.0.0.3", 7001)], 0.0,
             known={("10.0.0.5", 7001)})
    assert targets(5) == [("10.0.0.2", 7001), ("10.0.0.4", 7001)]
    sp.answered(("10.0.0.4", 7001), 8.0)
    assert targets(17) == [("10.0.0.2", 7001), ("10.0.0.4", 7001)]
    assert targets(18.5) == [("10.0.0.2", 7001)]      # learnt, silent for more than 10 s


def test_static_names_resolve_through_the_resolver():
    sp = StaticPeers([("localhost", 7001)])
    assert asyncio.run(sp.targets(0.0, set())) == [("127.0.0.1", 7001)]


def test_pick_address_prefers_the_advertised_then_routable():
    assert pick_address(["127.0.0.1", "169.254.1.1", "10.0.0.2"]) == "10.0.0.2"
    assert pick_address(["10.0.0.2", "10.0.0.3"], preferred="10.0.0.3") == "10.0.0.3"
    assert pick_address(["10.0.0.2"], preferred="10.9.9.9") == "10.0.0.2"
    assert pick_address(["127.0.0.1"]) == "127.0.0.1"
    assert pick_address(["fe80::1"]) == ""


# --- PeerTable ------------------------------------------------------------------------------------

class Recorder:
    def __init__(self, table: PeerTable) -> None:
        self.events = []
        table.on_join.append(lambda a: self.events.append(("join", a.node_id, a.revision)))
        table.on_leave.append(lambda a, r: self.events.append(("leave", a.node_id, r)))
        table.on_change.append(lambda o, n: self.events.append(("change", n.node_id, n.revision)))

    def take(self):
        out, self.events = self.events, []
        return out


@pytest.fixture
def table():
    t = PeerTable("me", "home", timeout_s=3.0, forget_after_s=100.0)
    return t, Recorder(t)


def test_table_mdns_alone_makes_a_candidate_not_a_peer(table):
    t, rec = table
    t.found(advert("n2"), 0.0)
    assert t.peers() == [] and [a.node_id for a in t.candidates()] == ["n2"]
    assert rec.take() == []
    t.heard(advert("n2"), 0.5)
    assert [a.node_id for a in t.peers()] == ["n2"] and t.candidates() == []
    assert rec.take() == [("join", "n2", 0)]


def test_table_timeout_and_return(table):
    t, rec = table
    t.heard(advert("n2"), 10.0)
    t.heard(advert("n3"), 10.0)
    rec.take()
    t.heard(advert("n2"), 12.9)
    assert t.expire(13.0) == [] and t.expire(13.0) == []
    left = t.expire(13.01)
    assert [a.node_id for a in left] == ["n3"]
    assert rec.take() == [("leave", "n3", "no heartbeat for 3.0 s (timeout 3 s)")]
    assert t.entry("n3").state == GONE and t.entry("n2").state == LIVE
    assert [a.node_id for a in t.gone()] == ["n3"]
    assert t.expire(15.9) == []
    assert [a.node_id for a in t.expire(16.0)] == ["n2"]
    t.heard(advert("n3"), 20.0)
    assert rec.take() == [("leave", "n2", "no heartbeat for 3.1 s (timeout 3 s)"),
                          ("join", "n3", 0)]
    assert [a.node_id for a in t.peers()] == ["n3"]


def test_table_forgets_gone_peers_and_stale_candidates(table):
    t, _ = table
    t.heard(advert("n2"), 0.0)
    t.found(advert("n3"), 0.0)
    t.expire(5.0)
    assert t.entry("n2").state == GONE and t.entry("n3").state == CANDIDATE
    t.expire(100.0)
    assert t.entry("n3") is not None
    t.expire(100.5)
    assert t.entry("n3") is None and t.entry("n2") is not None
    t.expire(105.5)
    assert t.entry("n2") is None and t.entries() == []


def test_table_revisions_and_instances(table):
    t, rec = table
    t.heard(advert("n2", revision=3, term=1), 0.0)
    t.heard(advert("n2", revision=2, term=0), 0.1)          # a late datagram: ignored
    assert t.peers()[0].term == 1
    t.heard(advert("n2", revision=4, term=2), 0.2)
    t.found(advert("n2", revision=5, term=3), 0.3)          # mDNS TXT update of a live peer
    t.found(advert("n2", revision=5, term=3), 0.35)         # the same again: nothing
    assert rec.take() == [("join", "n2", 3), ("change", "n2", 4), ("change", "n2", 5)]
    t.found(advert("n2", instance="b2", revision=0), 0.4)   # a new instance seen on mDNS only
    assert t.peers()[0].instance == "a1" and rec.take() == []
    t.heard(advert("n2", instance="b2", revision=0), 0.5)   # ... and heard: it restarted
    assert rec.take() == [("leave", "n2", "restarted (new instance)"), ("join", "n2", 0)]
    t.expire(3.4)
    assert t.peers() and t.expire(3.6)                      # heard at 0.5, not at 0.0


def test_table_complete_advert_replaces_a_txt_summary_of_the_same_revision(table):
    t, rec = table
    summary = advert("n2", models=("a",), revision=1)
    full = advert("n2", models=("a", "b"), revision=1)
    t.found(summary, 0.0, complete=False)
    t.found(full, 0.1, complete=True)
    assert t.entry("n2").advert.models == ("a", "b")
    t.found(summary, 0.2, complete=False)
    assert t.entry("n2").advert.models == ("a", "b")
    t.heard(full, 0.3)
    assert rec.take() == [("join", "n2", 1)]


def test_table_goodbye_filters_and_failing_callbacks(table, caplog):
    t, rec = table
    t.heard(advert("n2"), 0.0)
    t.found(advert("n3"), 0.0)
    t.heard(advert("me"), 0.0)                              # this node itself
    t.heard(advert("n4", cluster="office"), 0.0)            # another cluster
    t.found(advert("n5", cluster="office"), 0.0)
    assert [e.advert.node_id for e in t.entries()] == ["n2", "n3"]
    t.goodbye("n2", 1.0, "said goodbye on mDNS")
    t.goodbye("n3", 1.0)
    t.goodbye("unknown", 1.0)
    assert rec.take() == [("join", "n2", 0), ("leave", "n2", "said goodbye on mDNS")]
    assert t.entry("n3") is None and t.entry("n2").state == GONE
    assert t.expire(50.0) == []                             # gone peers do not leave twice

    def boom(a):
        raise RuntimeError("callback bug")
    t.on_join.insert(0, boom)
    with caplog.at_level(logging.ERROR):
        t.heard(advert("n6"), 2.0)
    assert "callback" in caplog.text and rec.take() == [("join", "n6", 0)]


def test_table_rejects_a_bad_timeout():
    with pytest.raises(ValueError, match="timeout_s"):
        PeerTable("me", "home", timeout_s=0)
