"""Where dllama-ctl finds the daemon's files: the key file, the control socket, the model.

dllama-ctl reads the same configuration the daemon reads (daemon/config.py: the file
/etc/dllama-node/dllama-node.conf, then DLLAMA_* environment variables), so that
`dllama-ctl key id` and `dllama-ctl status` look where the service looks. A flag on the
command line wins over both. A configuration file this user may not read is not an error
for dllama-ctl (it is usually root:dllama-node 0640): the defaults and the environment
are used, and a debug line says so.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from dllama_node.common.errors import UsageError
from dllama_node.daemon.config import DEFAULT_CONFIG_PATH, DaemonConfig, load_config

log = logging.getLogger(__name__)


def ctl_config(config_path: Optional[str] = None) -> DaemonConfig:
    """The daemon's configuration as this user can read it.

    `config_path` None means the default file. A file given explicitly that cannot be
    read is an error; the default file unreadable is tolerated."""
    explicit = config_path
    path = explicit or DEFAULT_CONFIG_PATH
    if not explicit and os.path.exists(path) and not os.access(path, os.R_OK):
        log.debug("config file %s is not readable by uid %d: using defaults and environment",
                  path, os.getuid())
        return load_config("/nonexistent/dllama-node.conf")
    if explicit and not os.path.exists(path):
        raise UsageError(f"config file {path} does not exist")
    return load_config(path)
