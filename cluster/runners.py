"""One interface over a single node or a cluster: what generation, the HTTP API and the
commands read, whichever of the two runs the model.

Both runners give .session (generation), .tokenizer, .seq_len, .reason (why that
context), .threads, .weights_bytes, .kv_cache_bytes, .plan, .reports and .sync_stats
(None and empty for a single node). They live here, below both of their users, because
dllama-ctl opens them for a model run in its own process (ctl/runner.py) and the daemon
wraps its ClusterRoot in one for the HTTP API: the runners depend on engine/ and
cluster/, never on either command.
"""
from __future__ import annotations


class SingleRunner:
    """One node in this process: an engine.node.LocalNode."""

    def __init__(self, node):
        self.node = node
        self.session = node.session
        self.tokenizer = node.tokenizer
        self.seq_len = node.context.seq_len
        self.reason = node.context.reason
        self.threads = node.transformer.n_threads
        self.weights_bytes = node.weights.nbytes()
        self.kv_cache_bytes = node.transformer.cache.nbytes
        self.plan = None
        self.reports = []
        self.sync_stats = None

    def generate(self, *args, **kw):
        return self.session.generate(*args, **kw)


class ClusterRunner:
    """A started cluster.root.ClusterRoot; its session is read at each use, since the
    root replaces it when it re-plans after a node failed."""

    def __init__(self, root):
        self.root = root
        self.tokenizer = root.tokenizer
        self.plan = root.plan
        self.seq_len = root.plan.max_seq_len
        self.reason = root.plan.seq_len_reason
        self.threads = root.threads
        self.reports = root.reports
        self.weights_bytes = sum(r.weights_bytes for r in root.reports)
        self.kv_cache_bytes = sum(r.kv_cache_bytes for r in root.reports)

    @property
    def session(self):
        return self.root.session

    @property
    def sync_stats(self):
        return self.root.sync.stats

    def node_stats(self, reset: bool = False) -> dict:
        return self.root.node_stats(reset)

    def generate(self, *args, **kw):
        return self.root.generate(*args, **kw)
