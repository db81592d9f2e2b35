"""The generation loop, in token ids only: prompt in batches, then one token at a time.

The tokenizer lives at the edge (engine/text.py, the CLI): here a prompt is a list of
ids and the output is a stream of ids. The first generated token is sampled from the
logits of the last prompt token, then fed back at the next position.

A Session keeps what is already in the KV cache, so the next request that starts with
the same tokens (the next turn of a chat) evaluates only what is new.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np

from dllama_node.common.errors import ContextFullError, UsageError
from dllama_node.engine.forward import Transformer
from dllama_node.engine.sampler import Sampler


@dataclass
class Timings:
    prompt_tokens: int = 0        # tokens evaluated for the prompt (after cache reuse)
    prompt_s: float = 0.0
    generated_tokens: int = 0
    decode_steps: int = 0         # forward passes of one token each
    decode_s: float = 0.0         # from the first sampled token to the last

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class Session:
    transformer: Transformer
    cached: List[int] = field(default_factory=list)   # ids whose K/V are in the cache
    timings: Timings = field(default_factory=Timings)
    # what to do about a prompt longer than the context (engine/context.py's advice)
    context_advice: str = "shorten the prompt"

    @property
    def seq_len(self) -> int:
        return self.transformer.seq_len

    def reset(self) -> None:
        self.cached = []

    def _eval_prompt(self, prompt: Sequence[int],
                     progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
        """Evaluate what of `prompt` is not cached yet; logits of its last token."""
        reuse = 0
        for a, b in zip(self.cached, prompt[:-1]):   # always re-run the last prompt token
            if a != b:
                break
            reuse += 1
        todo = list(prompt[reuse:])
        batch = self.transformer.batch
        t0 = time.perf_counter()
        logits = None
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            last = start + batch >= len(todo)
            logits = self.transformer.forward(np.asarray(chunk, np.int64), reuse + start,
                                              logits=last)
            if progress:
                progress(min(start + batch, len(todo)), len(todo))
        self.timings.prompt_tokens = len(todo)
        self.timings.prompt_s = time.perf_counter() - t0
        self.cached = list(prompt)
        return logits

    def generate(self, prompt: Sequence[int], max_tokens: int, sampler: Sampler,
                 stop_ids: Sequence[int] = (),
                 progress: Optional[Callable[[int, int], None]] = None,
                 vocab_limit: Optional[int] = None) -> Iterator[int]:
        """Yield up to max_tokens ids; stops after an id in stop_ids (not yielded) or when
        the context is full. The caller may stop early by closing the iterator.
        vocab_limit: sample only ids below it (a model whose embedding rows are padded
        beyond its tokenizer's vocabulary)."""
        if not prompt:
            raise UsageError("the prompt is empty: give at least one token")
        if max_tokens < 0:
            raise UsageError(f"max tokens {max_tokens}: expected 0 or more")
        if len(prompt) >= self.seq_len:
            raise ContextFullError(f"the prompt has {len(prompt)} tokens, the context holds "
                                   f"{self.seq_len}: {self.context_advice}")
        self.timings = Timings()
        logits = self._eval_prompt(prompt, progress)
        stop = set(int(i) for i in stop_ids)
        recent = list(prompt)
        t0 = time.perf_counter()
        try:
            for _ in range(max_tokens):
                token = sampler.sample(logits[:vocab_limit], recent)
                self.timings.generated_tokens += 1
                if token in stop:
                    return
                recent.append(token)
                yield token
                pos = len(self.cached)
                if pos >= self.seq_len:
                    return
                logits = self.transformer.forward(np.asarray([token], np.int64), pos)
                self.cached.append(token)
                self.timings.decode_steps += 1
        finally:
            self.timings.decode_s = time.perf_counter() - t0
