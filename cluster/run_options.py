"""How to run a model: the options that flow, as one object, from the command line
(ctl/cli.py) to the runner (ctl/runner.py), the local cluster (cluster/local.py) and the
root (cluster/root.py); the daemon builds one from its configuration.

Options are what a person or a benchmark chooses. What a run is given besides (the
sockets of its workers, their capacities, the cluster key) is passed next to them.
The one setting read from the environment, DLLAMA_SYNC_SPIN_US, is read here, when the
options are made, and nowhere deeper.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

from dllama_node.cluster.protocol import DEFAULT_TIMEOUT_S

# In the mesh, how long a node waiting for its peers' parts keeps polling before it
# sleeps, while most waits end within that (cluster/sync_tcp.py): a peer that is a few
# microseconds behind then costs no sleep and wake-up (TinyLlama, 2 nodes on loopback:
# sync 3.2 -> 2.0 ms per token on a quiet machine).
DEFAULT_SPIN_US = 150
SPIN_US_VARIABLE = "DLLAMA_SYNC_SPIN_US"


def spin_us_from_environment(env: Optional[Mapping[str, str]] = None) -> int:
    """DLLAMA_SYNC_SPIN_US when set (microseconds), else DEFAULT_SPIN_US."""
    env = os.environ if env is None else env
    return int(env.get(SPIN_US_VARIABLE, DEFAULT_SPIN_US))


@dataclass(frozen=True)
class RunOptions:
    """One model run, on this node or a cluster.

    threads: compute threads per node; None: the caller's default (one per local node,
        the cores for the daemon). max_seq_len: None plans the longest context that fits.
    nodes: for a local cluster, how many processes of this machine. split: relative share
        of the work per node, one weight per node; None: by speed. wire: how activations
        cross the network (q8_0 or f32). stream_weights: workers get their slices from the
        root instead of their own copy of the file. load_tokenizer: False for runs that feed
        token ids only (bench). batch: tokens per forward step. timeout_s: how long a peer
        may stay silent. allow_swap: plan weights into swap. spin_us: how long a mesh
        node polls before it sleeps (the mesh is the only all-reduce; bench/star_sync.py's
        star is chosen by its root class, not an option).
    """

    model_path: str
    tokenizer_path: Optional[str] = None
    threads: Optional[int] = None
    max_seq_len: Optional[int] = None
    nodes: int = 1
    split: Optional[Tuple[float, ...]] = None
    wire: str = "q8_0"
    stream_weights: bool = False
    load_tokenizer: bool = True
    batch: int = 64
    timeout_s: float = DEFAULT_TIMEOUT_S
    allow_swap: bool = False
    spin_us: int = field(default_factory=spin_us_from_environment)

    def __post_init__(self):
        from dllama_node.common.errors import UsageError

        if self.nodes < 1:
            raise UsageError(f"--nodes {self.nodes}: expected 1 or more")
