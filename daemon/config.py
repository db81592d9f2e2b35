"""The daemon's configuration: one object, filled from the file, then the environment,
then the command line (each overriding the one before).

The file is /etc/dllama-node/dllama-node.conf (documented default: daemon/dllama-node.conf,
installed as a conffile): `key = value` lines, `#` comments, one [dllama-node] section or
none. Environment: DLLAMA_<KEY> (e.g. DLLAMA_MODEL). Flags: --<key> (see dllama-node --help).
"""
from __future__ import annotations

import configparser
import dataclasses
import os
import socket
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from dllama_node.common.errors import UsageError

DEFAULT_CONFIG_PATH = "/etc/dllama-node/dllama-node.conf"


def default_node_id() -> str:
    """The host name, made a valid node id, with a few characters of the machine id:
    every Raspberry Pi OS board starts out called "raspberrypi"."""
    import re
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:40] or "node"
    try:
        with open("/etc/machine-id") as f:
            suffix = f.read().strip()[:6]
    except OSError:
        suffix = ""
    return f"{host}-{suffix}" if suffix else host


@dataclass(frozen=True)
class DaemonConfig:
    node_id: str = field(default_factory=default_node_id)
    cluster: str = "default"                # only nodes of the same cluster name join
    model: Optional[str] = None             # model file this node holds (GGUF or .m)
    tokenizer: Optional[str] = None
    listen: str = "0.0.0.0:7321"            # the cluster port (data plane and negotiation)
    control_socket: str = "/run/dllama-node/control.sock"   # dllama-ctl talks to this
    state_dir: str = "/var/lib/dllama-node"
    key_file: str = "/etc/dllama-node/cluster.key"
    static_peers: Tuple[str, ...] = ()      # HOST:PORT of peers where multicast is blocked
    mdns: bool = True
    interfaces: Tuple[str, ...] = ()        # zeroconf interfaces; empty: all
    threads: int = 0                        # 0: the cores this process may use
    max_seq_len: int = 0                    # 0: what fits every node
    allow_swap: bool = False
    coordinator_only: bool = False          # may be root, holds no slice
    never_root: bool = False
    wire: str = "q8_0"
    lock_memory: bool = True
    nice: int = -10
    http_listen: str = "127.0.0.1:8080"     # the OpenAI-compatible API; "off": none
    http_queue: int = 8                     # requests that may wait for the engine
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 3.0

    @property
    def http_host_port(self) -> Optional[Tuple[str, int]]:
        """(host, port) of the HTTP API, or None when it is off."""
        if self.http_listen.strip().lower() in ("", "off", "no", "none"):
            return None
        host, _, port = self.http_listen.rpartition(":")
        try:
            return host or "127.0.0.1", int(port)
        except ValueError:
            raise UsageError(f"http_listen {self.http_listen!r}: expected HOST:PORT or off") from None

    @property
    def listen_host_port(self) -> Tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        try:
            return host or "0.0.0.0", int(port)
        except ValueError:
            raise UsageError(f"listen {self.listen!r}: expected HOST:PORT") from None


_FIELDS = {f.name: f for f in dataclasses.fields(DaemonConfig)}


def _convert(name: str, value, source: str):
    f = _FIELDS.get(name)
    if f is None:
        raise UsageError(f"{source}: unknown setting {name!r} (known: {', '.join(sorted(_FIELDS))})")
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if "bool" in kind:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "yes", "true", "on"):
                return True
            if text in ("0", "no", "false", "off"):
                return False
            raise ValueError(value)
        if "Tuple" in kind:
            if isinstance(value, (list, tuple)):
                return tuple(value)
            return tuple(v.strip() for v in str(value).replace(",", " ").split() if v.strip())
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if "Optional" in kind:
            return str(value) if value not in (None, "") else None
        return str(value)
    except ValueError:
        raise UsageError(f"{source}: {name} = {value!r} is not a valid {kind}") from None


def read_file(path: str) -> Dict[str, object]:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise UsageError(f"config file {path}: {e.strerror}") from None
    if not any(line.lstrip().startswith("[") for line in text.splitlines()):
        text = "[dllama-node]\n" + text      # a file of bare key = value lines
    try:
        parser.read_string(text, source=path)
    except configparser.Error as e:
        raise UsageError(f"config file {path}: {e}") from None
    out = {}
    for section in parser.sections():
        for key, value in parser.items(section):
            name = key.replace("-", "_")
            out[name] = _convert(name, value, f"config file {path}")
    return out


def from_environment(env: Mapping[str, str]) -> Dict[str, object]:
    out = {}
    for key, value in env.items():
        if key.startswith("DLLAMA_") and key[7:].lower() in _FIELDS:
            name = key[7:].lower()
            out[name] = _convert(name, value, f"environment {key}")
    return out


def load_config(path: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                flags: Optional[Mapping[str, object]] = None) -> DaemonConfig:
    """File, then environment, then flags (None values in flags mean 'not given')."""
    values: Dict[str, object] = {}
    values.update(read_file(path or DEFAULT_CONFIG_PATH))
    values.update(from_environment(os.environ if env is None else env))
    for name, value in (flags or {}).items():
        if value is not None and value != ():
            values[name] = _convert(name, value, f"--{name.replace('_', '-')}")
    config = DaemonConfig(**values)
    config.listen_host_port  # validates
    config.http_host_port
    return config


@dataclass(frozen=True)
class ConfigSource:
    """Where the daemon's configuration comes from: the file (None: the default path) and
    the command line's flags, those given only (the environment is read at each load).
    The service keeps it to reload from the same place on SIGHUP."""

    path: Optional[str] = None
    flags: Mapping[str, object] = field(default_factory=dict)

    def load(self, env: Optional[Mapping[str, str]] = None) -> DaemonConfig:
        return load_config(self.path, env, self.flags)
