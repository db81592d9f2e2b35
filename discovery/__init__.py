"""Peer discovery: mDNS (python-zeroconf) and a static peer list, with heartbeats."""
