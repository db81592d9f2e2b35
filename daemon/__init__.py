"""The dllama-node service: capacity, election, negotiation, systemd integration."""
