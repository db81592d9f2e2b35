"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Kept apart from the model (llama2.c, nanochat): it sees logits and recent token ids,
nothing else, and takes an explicit seeded RNG so runs repeat exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from dllama_node.common.errors import UsageError


@dataclass(frozen=True)
class SamplerSettings:
    temperature: float = 0.8          # 0: greedy (argmax)
    top_k: int = 40                   # 0: no limit
    top_p: float = 0.95               # 1.0: no limit
    repetition_penalty: float = 1.0   # 1.0: none; > 1 discourages recent tokens
    repeat_last_n: int = 64           # how many recent tokens the penalty looks at
    seed: Optional[int] = None        # None: a fresh seed each run

    def validate(self) -> "SamplerSettings":
        if not (self.temperature >= 0 and np.isfinite(self.temperature)) or self.temperature > 100:
            raise UsageError(f"temperature {self.temperature}: expected a number from 0 (greedy) to 100")
        if self.top_k < 0:
            raise UsageError(f"top-k {self.top_k}: expected 0 (off) or a positive count")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top-p {self.top_p}: expected a number in (0, 1]")
        if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            raise UsageError(f"repetition penalty {self.repetition_penalty}: expected a number > 0 "
                             "(1.0 is off)")
        if self.repeat_last_n < 0:
            raise UsageError(f"repeat-last-n {self.repeat_last_n}: expected 0 or more tokens")
        if self.seed is not None and not 0 <= self.seed < 2 ** 64:
            raise UsageError(f"seed {self.seed}: expected 0 .. 2^64-1")
        return self


class Sampler:
    def __init__(self, settings: SamplerSettings):
        self.settings = settings.validate()
        self.rng = np.random.default_rng(settings.seed)

    def sample(self, logits: np.ndarray, recent: Sequence[int] = ()) -> int:
        """One token id from float32 logits (vocab_size,)."""
        st = self.settings
        z = np.asarray(logits, dtype=np.float64)
        if st.repetition_penalty != 1.0 and st.repeat_last_n and len(recent):
            z = z.copy()
            ids = np.unique(np.asarray(recent[-st.repeat_last_n:], dtype=np.int64))
            vals = z[ids]
            z[ids] = np.where(vals > 0, vals / st.repetition_penalty, vals * st.repetition_penalty)
        if st.temperature == 0:
            return int(np.argmax(z))

        candidates = np.arange(z.shape[0])
        if 0 < st.top_k < z.shape[0]:
            candidates = np.argpartition(-z, st.top_k - 1)[:st.top_k]
        order = candidates[np.argsort(-z[candidates], kind="stable")]
        scaled = z[order] / st.temperature
        probs = np.exp(scaled - scaled[0])
        probs /= probs.sum()
        if st.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), st.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
