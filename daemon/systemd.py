"""Talking to systemd: sd_notify through python-systemd, behind a facade that does nothing
when systemd is absent.

Under a `Type=notify` unit systemd sets NOTIFY_SOCKET and, with `WatchdogSec=`,
WATCHDOG_USEC (and WATCHDOG_PID). The notification itself is libsystemd's sd_notify(3),
reached through python-systemd (`systemd.daemon.notify`; Debian's python3-systemd, a
Depends of the .deb): it handles the socket, abstract addresses ('@name') and the
credentials. Without NOTIFY_SOCKET every call is a no-op returning False, so the daemon
calls these unconditionally; without python-systemd (a pip install without the `systemd`
extra) they are no-ops too, said once when systemd did ask for notifications.

    from dllama_node.daemon import systemd
    systemd.ready("node b2: serving layers 0-15")
    ...
    systemd.watchdog_ping()          # from the loop that does the work, so a hang stops it
    systemd.stopping()

The watchdog must be pinged from the loop that does the real work (piwheels' rule): a
hung compute loop then stops the pings and systemd restarts the node. python-systemd has
no sd_watchdog_enabled(), so watchdog_interval_s() reads the two variables itself.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Mapping, Optional

try:
    from systemd import daemon as sd_daemon     # python3-systemd / systemd-python
except ImportError:
    sd_daemon = None

log = logging.getLogger(__name__)

_warned = threading.Event()     # a failed notification is said once, then dropped quietly


def _warn_once(reason: str) -> None:
    if not _warned.is_set():
        _warned.set()
        log.warning("sd_notify to %s failed: %s; notifications are dropped",
                    os.environ.get("NOTIFY_SOCKET"), reason)


def enabled(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when systemd gave us a notify socket (we run under a unit with Type=notify)."""
    env = os.environ if environ is None else environ
    return bool(env.get("NOTIFY_SOCKET"))


def notify(**fields: object) -> bool:
    """Send NAME=value assignments in one notification; False when not under systemd or
    when the send failed (the node runs on).

    Field names are written upper-case (ready=1 -> READY=1); newlines in values become
    spaces, as STATUS= is one line.
    """
    if not enabled():
        return False
    if sd_daemon is None:
        _warn_once("python-systemd (python3-systemd) is not installed")
        return False
    state = "\n".join(f"{name.upper()}={str(value).replace(chr(10), ' ')}"
                      for name, value in fields.items())
    try:
        return bool(sd_daemon.notify(state))
    except OSError as e:            # systemd gone, or a bad path: keep running
        _warn_once(str(e))
        return False


def ready(status: Optional[str] = None) -> bool:
    """READY=1: startup is done (systemd's `start` returns, dependants start)."""
    return notify(ready=1) if status is None else notify(ready=1, status=status)


def status(text: str) -> bool:
    """STATUS=text: one line shown by `systemctl status`."""
    return notify(status=text)


def reloading(status: Optional[str] = None) -> bool:
    """RELOADING=1 with MONOTONIC_USEC (what Type=notify-reload expects); call ready() after."""
    fields = {"reloading": 1, "monotonic_usec": time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}
    if status is not None:
        fields["status"] = status
    return notify(**fields)


def stopping(status: Optional[str] = None) -> bool:
    """STOPPING=1: the service is shutting down on purpose."""
    return notify(stopping=1) if status is None else notify(stopping=1, status=status)


def extend_timeout(timeout_s: float) -> bool:
    """EXTEND_TIMEOUT_USEC: ask for more time to start (a slow model load)."""
    return notify(extend_timeout_usec=int(timeout_s * 1_000_000))


def watchdog_ping() -> bool:
    """WATCHDOG=1: we are alive; send every watchdog_interval_s() / 2 or more often."""
    if watchdog_interval_s() is None:
        return False
    return notify(watchdog=1)


def watchdog_interval_s(environ: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """WatchdogSec= of the unit in seconds, or None when no watchdog is armed for us."""
    env = os.environ if environ is None else environ
    usec_text, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not enabled(env) or not usec_text:
        return None
    if pid and pid != str(os.getpid()):
        return None         # the watchdog is for another process (our parent)
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number of microseconds; no watchdog pings", usec_text)
        return None
    return usec / 1_000_000 if usec > 0 else None
