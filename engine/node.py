"""One node with the whole model: open the file, check the tokenizer, size the context,
bind the weights, build the transformer. What `dllama-ctl generate/chat/bench` run when
no cluster is given."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

from dllama_node.common.memory import read_memory
from dllama_node.engine.context import ContextChoice, choose_max_seq_len
from dllama_node.engine.forward import RunState, Transformer
from dllama_node.engine.generate import Session
from dllama_node.engine.kv_cache import KVCache
from dllama_node.engine.load import load_weights
from dllama_node.engine.weights import NodeWeights

log = logging.getLogger(__name__)

DEFAULT_BATCH = 64


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


@dataclass
class LocalNode:
    model: object            # dllama_node.model.ModelFile
    tokenizer: object        # dllama_node.tokenizer.Tokenizer
    weights: NodeWeights
    context: ContextChoice
    transformer: Transformer
    session: Session

    @classmethod
    def open(cls, model_path: str, tokenizer_path: Optional[str] = None,
             max_seq_len: Optional[int] = None, threads: Optional[int] = None,
             batch: int = DEFAULT_BATCH, load_tokenizer_: bool = True,
             progress=None) -> "LocalNode":
        from dllama_node.model import open_model
        from dllama_node.tokenizer import load_tokenizer

        model = open_model(model_path)
        try:
            cfg = model.config
            tok = (load_tokenizer(model.metadata, cfg.vocab_size, tokenizer_path)
                   if load_tokenizer_ else None)
            weights = NodeWeights.bind(model)   # views: sizes known before reading anything
            per_pos = KVCache.bytes_for(cfg.n_layers, 1, cfg.kv_dim)
            threads = threads or default_threads()
            # buffers: activations for one batch; the context's own scratch is small
            buffers = RunState(weights, batch, 1, threads).nbytes()
            context = choose_max_seq_len(cfg.seq_len, per_pos, weights.nbytes() + buffers,
                                         read_memory().available_bytes, max_seq_len)
            log.info("%s", context.reason)
            weights = load_weights(model, progress=progress)
            transformer = Transformer(weights, context.seq_len, threads, batch)
        except BaseException:
            model.close()
            raise
        return cls(model, tok, weights, context, transformer,
                   Session(transformer, context_advice=context.advice))

    def close(self) -> None:
        self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
