"""Peer discovery: mDNS (python-zeroconf) and a static peer list, with heartbeats.

    txt.py        NodeAdvert (what a node offers) and its TXT / JSON encodings
    peers.py      PeerTable: adverts from every source merged; join / leave / change (pure)
    mdns.py       register `_dllama._tcp.local.`, browse, update the TXT, goodbye
    static.py     `--static-peer HOST:PORT` endpoints, and endpoints learnt by gossip
    heartbeat.py  UDP heartbeats: liveness, static-peer queries, the full advert
    service.py    Discovery: the three above in one asyncio service
"""
from .peers import PeerEntry, PeerTable
from .service import Discovery, DiscoveryConfig
from .static import parse_static_peer
from .txt import NodeAdvert, decode_txt, encode_txt

__all__ = ["Discovery", "DiscoveryConfig", "NodeAdvert", "PeerEntry", "PeerTable", "decode_txt",
           "encode_txt", "parse_static_peer"]
