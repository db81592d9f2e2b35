"""One discovery node for the multi-process tests: runs Discovery until SIGTERM and writes
one JSON object per line to stdout:

    {"event": "ready", "t": ...}                       started (mDNS registered)
    {"event": "mdns_found", "node_id": ...}            an advert came in over mDNS
    {"event": "join", "advert": {...}}                 a peer became live
    {"event": "change", "advert": {...}}               a live peer's advert changed
    {"event": "leave", "node_id": ..., "reason": ...}  a live peer left
    {"event": "stopped", "threads": n, "tasks": n}     after stop(), what is still running

"t" is time.monotonic(), one clock for every namespace of the machine. SIGUSR1 raises the
election term by one (update_advert), to test that changes travel.

    python tests/discovery_node.py --node-id n0 --port 7000 --hb-port 7001 [--no-mdns]
        [--static-peer 10.0.0.2:7001 ...] [--interface 127.0.0.1] [--bind 127.0.0.1]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
import time

from dllama_node.discovery import Discovery, DiscoveryConfig, NodeAdvert, parse_static_peer


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> None:
    advert = NodeAdvert(args.node_id, args.cluster, args.port, args.hb_port, address=args.address,
                        available_ram_bytes=args.ram, cores=args.cores, speed=args.speed,
                        models=tuple(args.model))
    config = DiscoveryConfig(interval_s=args.interval, timeout_s=args.timeout,
                             static_peers=[parse_static_peer(s) for s in args.static_peer],
                             mdns=not args.no_mdns, interfaces=args.interface or None,
                             bind_host=args.bind)
    d = Discovery(advert, config)
    d.table.on_join.append(lambda a: emit("join", advert=a.to_dict()))
    d.table.on_change.append(lambda old, new: emit("change", advert=new.to_dict()))
    d.table.on_leave.append(lambda a, reason: emit("leave", node_id=a.node_id, reason=reason))
    if d.mdns is not None:
        found = d.mdns.on_found

        def on_found(a: NodeAdvert, complete: bool) -> None:
            emit("mdns_found", node_id=a.node_id, advert=a.to_dict())
            found(a, complete)
        d.mdns.on_found = on_found
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: d.update_advert(term=d.advert.term + 1,
                                                                     root_id=d.advert.node_id))
    await d.start()
    emit("ready", threads=threading.active_count())
    await stop.wait()
    await d.stop()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    emit("stopped", threads=threading.active_count(), tasks=len(others))


def parse_args(argv: list) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--node-id", required=True)
    p.add_argument("--cluster", default="test")
    p.add_argument("--port", type=int, default=7000)
    p.add_argument("--hb-port", type=int, default=7001)
    p.add_argument("--address", default="")
    p.add_argument("--ram", type=int, default=1 << 30)
    p.add_argument("--cores", type=int, default=4)
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--model", action="append", default=[])
    p.add_argument("--static-peer", action="append", default=[])
    p.add_argument("--no-mdns", action="store_true")
    p.add_argument("--interface", action="append", default=[])
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse_args(sys.argv[1:])
    logging.basicConfig(level=ns.log_level, stream=sys.stderr,
                        format=f"%(asctime)s {ns.node_id} %(name)s %(levelname)s %(message)s")
    asyncio.run(main(ns))
