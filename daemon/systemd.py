"""Talking to systemd: a small sd_notify facade that does nothing when systemd is absent.

Under a `Type=notify` unit systemd sets NOTIFY_SOCKET (a filesystem path, or an abstract
socket written with a leading '@') and, with `WatchdogSec=`, WATCHDOG_USEC (and
WATCHDOG_PID). Each notification is one AF_UNIX datagram of newline-separated
"NAME=value" assignments (sd_notify(3)). Without NOTIFY_SOCKET every call is a no-op
returning False, so the daemon calls these unconditionally.

    from dllama_node.daemon import systemd
    systemd.ready("node b2: serving layers 0-15")
    ...
    systemd.watchdog_ping()          # from the loop that does the work, so a hang stops it
    systemd.stopping()

The watchdog must be pinged from the loop that does the real work (piwheels' rule): a
hung compute loop then stops the pings and systemd restarts the node.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Mapping, Optional, Union

log = logging.getLogger(__name__)


def _address(notify_socket: str) -> Union[str, bytes]:
    """NOTIFY_SOCKET -> a socket address: '@name' is the abstract socket b'\\0name'."""
    if notify_socket.startswith("@"):
        return b"\0" + notify_socket[1:].encode()
    return notify_socket


class Notifier:
    """sd_notify over a plain datagram socket; inert when `address` is None.

    `environ` defaults to os.environ and is read once, at construction.
    """

    def __init__(self, address: Optional[str] = None, environ: Optional[Mapping[str, str]] = None):
        env = os.environ if environ is None else environ
        self._notify_socket = address if address is not None else env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._sock: Optional[socket.socket] = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when a notify socket was given (we run under systemd with Type=notify)."""
        return self._notify_socket is not None

    def notify(self, **fields: object) -> bool:
        """Send NAME=value assignments in one datagram; False when disabled or the send failed.

        Field names are written upper-case (ready=1 -> READY=1); values must not contain
        newlines (they are replaced by spaces, as STATUS= is one line).
        """
        if self._notify_socket is None:
            return False
        lines = [f"{name.upper()}={str(value).replace(chr(10), ' ')}" for name, value in fields.items()]
        payload = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # never block the working loop on a manager that is not reading
                self._sock.sendto(payload, socket.MSG_DONTWAIT, _address(self._notify_socket))
            except OSError as e:
                if not self._warned:  # systemd gone (or a bad path): say so once, keep running
                    log.warning("sd_notify to %s failed: %s; notifications are dropped",
                                self._notify_socket, e)
                    self._warned = True
                return False
        return True

    def ready(self, status: Optional[str] = None) -> bool:
        """READY=1: startup is done (systemd's `start` returns, dependants start)."""
        if status is None:
            return self.notify(ready=1)
        return self.notify(ready=1, status=status)

    def status(self, text: str) -> bool:
        """STATUS=text: one line shown by `systemctl status`."""
        return self.notify(status=text)

    def reloading(self, status: Optional[str] = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (what Type=notify-reload expects); call ready() after."""
        fields = {"reloading": 1, "monotonic_usec": time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}
        if status is not None:
            fields["status"] = status
        return self.notify(**fields)

    def stopping(self, status: Optional[str] = None) -> bool:
        """STOPPING=1: the service is shutting down on purpose."""
        if status is None:
            return self.notify(stopping=1)
        return self.notify(stopping=1, status=status)

    def extend_timeout(self, timeout_s: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for more time to start (a slow model load)."""
        return self.notify(extend_timeout_usec=int(timeout_s * 1_000_000))

    def watchdog_ping(self) -> bool:
        """WATCHDOG=1: we are alive; send every watchdog_interval_s() / 2 or more often."""
        if self.watchdog_interval_s() is None:
            return False
        return self.notify(watchdog=1)

    def watchdog_interval_s(self) -> Optional[float]:
        """WatchdogSec= of the unit in seconds, or None when no watchdog is armed for us."""
        if self._notify_socket is None or not self._watchdog_usec:
            return None
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None         # the watchdog is for another process (our parent)
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.warning("WATCHDOG_USEC=%r is not a number of microseconds; no watchdog pings",
                        self._watchdog_usec)
            return None
        return usec / 1_000_000 if usec > 0 else None

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


_notifier: Optional[Notifier] = None
_notifier_lock = threading.Lock()


def get_notifier() -> Notifier:
    """The process-wide Notifier, built from the environment on first use."""
    global _notifier
    with _notifier_lock:
        if _notifier is None:
            _notifier = Notifier()
        return _notifier


def ready(status: Optional[str] = None) -> bool:
    return get_notifier().ready(status)


def status(text: str) -> bool:
    return get_notifier().status(text)


def reloading(status: Optional[str] = None) -> bool:
    return get_notifier().reloading(status)


def stopping(status: Optional[str] = None) -> bool:
    return get_notifier().stopping(status)


def extend_timeout(timeout_s: float) -> bool:
    return get_notifier().extend_timeout(timeout_s)


def watchdog_ping() -> bool:
    return get_notifier().watchdog_ping()


def watchdog_interval_s() -> Optional[float]:
    return get_notifier().watchdog_interval_s()
