"""dllama-ctl's side of the control socket (daemon/control.py): one request per connection,
JSON lines back, the last with "done". Any node answers; it forwards generation to the root.

    client = DaemonClient.from_settings(socket_path=None, config_path=None)
    client.status()                       -> {"node_id", "state", "root_id", "nodes", ...}
    client.models()                       -> {"models": [...]}
    client.plan(model=None, max_seq_len=0) -> {"plan": {...}, "table": "..."}
    for line in client.generate({"messages": [...], "max_tokens": 64}):
        ...                               # {"token", "text"} lines, then the final answer

An answer with "error" becomes the DllamaError of its exit code (UsageError for 2,
MemoryPlanError for 5, ClusterError for 6 ...), so the CLI prints one line and exits with
the daemon's code. Closing a generate() iterator early closes the connection: the daemon
cancels that generation (that is how Ctrl-C in `dllama-ctl chat` stops an answer).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Dict, Iterator, Optional, Type

from dllama_node.common import errors
from dllama_node.common.errors import ClusterError, DllamaError, ProtocolError
from dllama_node.daemon.control import request

log = logging.getLogger(__name__)

SOCKET_ENV = "DLLAMA_CONTROL_SOCKET"
QUICK_TIMEOUT_S = 15.0       # status, models: the daemon answers from memory
PLAN_TIMEOUT_S = 120.0       # a dry-run plan reads the model's header, may ask every node
GENERATE_TIMEOUT_S = 600.0   # between two lines of a generation (the first may load slices)

_ERRORS_BY_CODE: Dict[int, Type[DllamaError]] = {
    errors.EXIT_USAGE: errors.UsageError,
    errors.EXIT_MODEL: errors.ModelFileError,
    errors.EXIT_TOKENIZER: errors.TokenizerError,
    errors.EXIT_MEMORY: errors.MemoryPlanError,
    errors.EXIT_CLUSTER: errors.ClusterError,
}


def error_from_answer(answer: dict) -> DllamaError:
    """The DllamaError that a {"done": true, "error", "exit_code"} line stands for."""
    code = answer.get("exit_code")
    cls = _ERRORS_BY_CODE.get(code, DllamaError) if isinstance(code, int) else DllamaError
    err = cls(str(answer.get("error") or "the daemon reported an error without a message"))
    if cls is DllamaError and isinstance(code, int) and code > 0:
        err.exit_code = code
    return err


def resolve_socket_path(socket_path: Optional[str] = None,
                        config_path: Optional[str] = None) -> str:
    """--socket, else DLLAMA_CONTROL_SOCKET, else control_socket of the service's config."""
    if socket_path:
        return socket_path
    if os.environ.get(SOCKET_ENV):
        return os.environ[SOCKET_ENV]
    from dllama_node.ctl.settings import ctl_config
    return ctl_config(config_path).control_socket


class DaemonClient:
    """Requests to the local dllama-node over its control socket at `path`.
    `without_service` says what the command can do without the service, for the error
    when there is no socket (e.g. "dllama-ctl chat --model FILE chats with ...")."""

    def __init__(self, path: str, without_service: str = ""):
        self.path = path
        self.without_service = without_service

    @classmethod
    def from_settings(cls, socket_path: Optional[str] = None,
                      config_path: Optional[str] = None,
                      without_service: str = "") -> "DaemonClient":
        return cls(resolve_socket_path(socket_path, config_path), without_service)

    def _check_reachable(self) -> None:
        """A clearer error than connect()'s for the two usual mistakes."""
        if not os.path.exists(self.path):
            alone = f"; without the service, {self.without_service}" \
                if self.without_service else ""
            raise ClusterError(f"no control socket at {self.path}: is dllama-node running on "
                               "this machine? (systemctl status dllama-node; another path: "
                               f"--socket or {SOCKET_ENV}){alone}")
        if not os.access(self.path, os.R_OK | os.W_OK):
            raise ClusterError(f"control socket {self.path} is not writable by uid "
                               f"{os.getuid()}: run as root, or join the socket's group "
                               "(sudo adduser $USER dllama-node, then log in again)")

    def stream(self, obj: dict, timeout_s: float) -> Iterator[dict]:
        """Each answer line; the final one raises its error instead when it has one."""
        self._check_reachable()
        log.debug("-> %s %s", self.path, obj.get("op"))
        lines = request(self.path, obj, timeout_s=timeout_s)
        with contextlib.closing(lines):         # closed early: the connection closes now
            while True:
                try:
                    answer = next(lines)
                except StopIteration:
                    return
                except socket.timeout:
                    raise ClusterError(f"dllama-node at {self.path} sent nothing for "
                                       f"{timeout_s:g} s during {obj.get('op')}") from None
                except ValueError as e:             # json.JSONDecodeError
                    raise ProtocolError(f"dllama-node at {self.path} answered a line that is "
                                        f"not JSON: {e}") from None
                except ConnectionError as e:
                    raise ClusterError(f"dllama-node at {self.path} dropped the connection "
                                       f"during {obj.get('op')}: {e.strerror or e}") from None
                if not isinstance(answer, dict):
                    raise ClusterError(f"dllama-node at {self.path} answered "
                                       f"{type(answer).__name__}, expected a JSON object")
                if answer.get("done") and answer.get("error") is not None:
                    raise error_from_answer(answer)
                yield answer

    def call(self, obj: dict, timeout_s: float = QUICK_TIMEOUT_S) -> dict:
        """The final answer of a request that does not stream."""
        final = None
        for answer in self.stream(obj, timeout_s):
            final = answer
        if final is None:
            raise ClusterError(f"dllama-node at {self.path} sent no answer to {obj.get('op')}")
        return final

    def status(self) -> dict:
        return self.call({"op": "status"})

    def models(self) -> dict:
        return self.call({"op": "models"})

    def plan(self, model: Optional[str] = None, max_seq_len: int = 0) -> dict:
        return self.call({"op": "plan", "model": model, "max_seq_len": int(max_seq_len or 0)},
                         PLAN_TIMEOUT_S)

    def generate(self, params: dict) -> Iterator[dict]:
        """Streamed {"token", "text"} lines, then the final {"done": true, ...}. `params`
        holds prompt or messages and the sampler settings (control.py's generate op)."""
        return self.stream(dict(params, op="generate"), GENERATE_TIMEOUT_S)
