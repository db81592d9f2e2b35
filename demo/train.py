"""Train the demo model from scratch: a tiny Llama that tells stories from demo/grammar.py.

    .venv/bin/python demo/train.py                     # writes demo/stories.gguf
    .venv/bin/python demo/train.py --steps 20 -o /tmp/x.gguf   # a quick, worse model

Steps, all seeded (same torch build, same file):
1. a SentencePiece BPE tokenizer (byte fallback, Llama's normalisation) trained on text
   from the grammar;
2. its pieces, scores and types as GGUF tokenizer metadata with the Llama 2 chat
   template, read back through our own tokenizer (dllama_node.tokenizer), which then
   encodes every training example exactly as `dllama-ctl chat` will encode a prompt;
3. a Hugging Face LlamaForCausalLM (RMSNorm, rope, SwiGLU, grouped-query attention)
   trained on chat turns ("Tell me a story about a dragon." -> a story) and plain
   stories, one thread, AdamW with warm-up and cosine decay;
4. the weights written as GGUF with our writer: Q/K rows permuted for GGML's
   adjacent-pair rope, matrices Q8_0 (model/quants.py, bit-exact with GGML), norms F32;
5. a check: the file loads in our engine, and its greedy answer is printed.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import random
import sys
import tempfile
import time
from typing import Dict, Iterator, List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grammar  # noqa: E402  (demo/ is a folder of scripts, not a package)

from dllama_node.model import quants  # noqa: E402
from dllama_node.model.config import ModelConfig  # noqa: E402
from dllama_node.model.generate import (llama_metadata, model_tensor_types,  # noqa: E402
                                         write_gguf_model)
from dllama_node.tokenizer import chat as chat_templates  # noqa: E402
from dllama_node.tokenizer.loader import load_tokenizer  # noqa: E402

log = logging.getLogger("demo.train")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "stories.gguf")

# Shapes: dim and hidden_dim not powers of two where it matters (hidden 704 = 22 x 32),
# 8 query heads on 4 KV heads so a 3-node split cuts through query-head groups.
CONFIG = ModelConfig(arch="llama", dim=256, hidden_dim=704, n_layers=4, n_heads=8,
                     n_kv_heads=4, head_dim=32, vocab_size=0, seq_len=256)
VOCAB_SIZE = 800            # asked of SentencePiece; 3 specials + 256 bytes + pieces
TOKENIZER_TEXTS = 4000      # grammar samples the tokenizer is trained on
CHAT_FRACTION = 0.85        # the rest are plain stories: <s> story </s>
BATCH = 8
STEPS = 1000
LR = 3e-3
WARMUP_STEPS = 30
SEED = 0
DEMO_PROMPT = "Tell me a story about a dragon."


# -- tokenizer ----------------------------------------------------------------------

def tokenizer_corpus(seed: int, n: int) -> Iterator[str]:
    """Lines the tokenizer learns from: chat turns in the template's wording, stories."""
    rng = random.Random(seed)
    for _ in range(n):
        turn = grammar.make_chat_turn(rng)
        yield f"[INST] {turn.user} [/INST] {turn.assistant}"


def train_sentencepiece(seed: int, vocab_size: int, workdir: str):
    """A SentencePiece BPE model trained on grammar text; returns the processor."""
    import sentencepiece as spm

    corpus = os.path.join(workdir, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        for line in tokenizer_corpus(seed, TOKENIZER_TEXTS):
            f.write(line + "\n")
    prefix = os.path.join(workdir, "stories")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, shuffle_input_sentence=False,
        input_sentence_size=0, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def tokenizer_metadata(sp) -> Dict[str, object]:
    """GGUF tokenizer.* keys of a SentencePiece model, with the Llama 2 chat template."""
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = np.array([sp.get_score(i) for i in range(n)], dtype=np.float32)
    types = np.ones(n, dtype=np.int32)                           # NORMAL
    for i in range(n):
        if sp.is_unknown(i):
            types[i] = 2
        elif sp.is_control(i):
            types[i] = 3
        elif sp.is_byte(i):
            types[i] = 6
        elif sp.is_unused(i):
            types[i] = 5
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": True,
        "tokenizer.chat_template": chat_templates.LLAMA2,
    }


def check_tokenizer(tok, sp, seed: int) -> None:
    """Our tokenizer (rebuilt from the metadata) encodes as the trained model does, and
    a chat prompt's ids are a prefix of the same turn with its answer."""
    rng = random.Random(seed)
    for _ in range(50):
        turn = grammar.make_chat_turn(rng)
        for text in (turn.user, turn.assistant):
            ours = tok.encode(text, add_bos=False)
            if ours != sp.encode(text):
                raise SystemExit(f"tokenizer mismatch on {text!r}")
            if tok.decode(ours) != text:
                raise SystemExit(f"tokenizer does not round-trip {text!r}")
        prompt = tok.encode_chat([{"role": "user", "content": turn.user}])
        full = tok.encode_chat(turn.messages(), add_generation_prompt=False)
        if full[:len(prompt)] != prompt:
            raise SystemExit(f"chat prompt ids are not a prefix of the whole turn: {turn.user!r}")


# -- data ---------------------------------------------------------------------------

def examples(tok, seed: int) -> Iterator[List[int]]:
    """Token ids of training examples: chat turns (Llama 2 format, ending in </s>) and
    plain stories (<s> story </s>)."""
    rng = random.Random(seed)
    while True:
        if rng.random() < CHAT_FRACTION:
            ids = tok.encode_chat(grammar.make_chat_turn(rng).messages(),
                                  add_generation_prompt=False)
        else:
            ids = tok.encode(grammar.make_story(rng).text) + [tok.eos_id]
        yield ids[:CONFIG.seq_len]


def batches(tok, seed: int, batch: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(input ids, labels) int64 (batch, longest); padding is EOS in the input and
    -100 (ignored) in the labels. Padding sits at the end, so causal attention never
    lets a real token see it."""
    stream = examples(tok, seed)
    while True:
        rows = [next(stream) for _ in range(batch)]
        width = max(len(r) for r in rows)
        ids = np.full((batch, width), tok.eos_id, dtype=np.int64)
        labels = np.full((batch, width), -100, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            labels[i, :len(r)] = r
        yield ids, labels


# -- model --------------------------------------------------------------------------

def hf_config(vocab_size: int, bos_id: int, eos_id: int):
    import transformers

    c = CONFIG
    return transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=bos_id, eos_token_id=eos_id, initializer_range=0.02,
        attn_implementation="sdpa")


def train(model, tok, seed: int, steps: int, batch: int, lr: float):
    """AdamW, linear warm-up then cosine decay to a tenth; returns [(step, loss)]."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < WARMUP_STEPS:
            return lr * (step + 1) / WARMUP_STEPS
        t = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    history = []
    data = batches(tok, seed, batch)
    t0 = time.monotonic()
    tokens = 0
    for step in range(steps):
        ids, labels = next(data)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int((labels != -100).sum())
        loss = out.loss.item()
        history.append((step, loss))
        if step % 20 == 0 or step == steps - 1:
            log.info("step %d/%d  loss %.3f  lr %.2e  %d tokens  %.0f s", step, steps,
                     loss, lr_at(step), tokens, time.monotonic() - t0)
    model.eval()
    return history, tokens


def held_out_loss(model, tok, seed: int, n_batches: int = 4) -> float:
    import torch

    data = batches(tok, seed, BATCH)
    total = count = 0.0
    with torch.no_grad():
        for _ in range(n_batches):
            ids, labels = next(data)
            n = int((labels[:, 1:] != -100).sum())
            loss = model(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss
            total += float(loss) * n
            count += n
    return total / count


# -- GGUF ---------------------------------------------------------------------------

def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half rows -> GGML's adjacent pairs (as llama.cpp converts)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_tensors(model, config: ModelConfig) -> Dict[str, np.ndarray]:
    """{GGUF name: float32 array} in llama.cpp's naming and layout."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        out.update({
            f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": permute_qk(sd[p + "self_attn.q_proj.weight"], config.n_heads),
            f"blk.{i}.attn_k.weight": permute_qk(sd[p + "self_attn.k_proj.weight"],
                                                 config.n_kv_heads),
            f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": sd[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": sd[p + "mlp.down_proj.weight"],
        })
    out["output_norm.weight"] = sd["model.norm.weight"]
    out["output.weight"] = sd["lm_head.weight"]
    return out


def write_model(path: str, model, config: ModelConfig, tok_metadata: Dict[str, object],
                description: str) -> int:
    """Write the GGUF file (matrices Q8_0, norms F32); returns its size in bytes."""
    c = config
    metadata = llama_metadata(c, quants.GGML_Q8_0, "dllama-node demo stories")
    metadata.update({"general.description": description, "general.license": "MIT"})
    metadata.update(tok_metadata)
    arrays = gguf_tensors(model, c)
    types = model_tensor_types(c, quants.GGML_Q8_0)
    if set(types) != set(arrays):
        raise SystemExit(f"tensor names differ: {sorted(set(types) ^ set(arrays))}")

    def chunks_for(name, shape, ggml_type):
        a = np.ascontiguousarray(arrays[name], dtype=np.float32)
        if a.shape != tuple(shape):
            raise SystemExit(f"tensor {name}: shape {a.shape}, expected {shape}")
        return [a if ggml_type == quants.GGML_F32 else quants.quantize_q8_0(a)]

    return write_gguf_model(path, metadata, types, chunks_for)


def engine_answer(path: str, prompt: str, max_tokens: int = 200) -> str:
    """The greedy chat answer of the written file, from our own engine."""
    from dllama_node.engine.generate_text import stop_ids
    from dllama_node.engine.node import LocalNode
    from dllama_node.engine.sampler import Sampler, SamplerSettings

    with LocalNode.open(path, threads=1) as node:
        tok = node.tokenizer
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
        out = list(node.session.generate(ids, max_tokens, Sampler(SamplerSettings(temperature=0)),
                                         stop_ids(tok), vocab_limit=tok.vocab_size))
        return tok.decode(out)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", default=DEFAULT_OUT, help="GGUF file to write")
    ap.add_argument("--steps", type=int, default=STEPS, help="training steps (batches)")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    import dataclasses

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dllama-demo-") as workdir:
        sp = train_sentencepiece(args.seed, VOCAB_SIZE, workdir)
    tok_md = tokenizer_metadata(sp)
    vocab_size = sp.get_piece_size()
    tok = load_tokenizer(tok_md, vocab_size)
    check_tokenizer(tok, sp, args.seed + 1)
    t_tok = time.monotonic() - t_start
    log.info("tokenizer: %d pieces in %.1f s", vocab_size, t_tok)

    import transformers

    config = dataclasses.replace(CONFIG, vocab_size=vocab_size)
    model = transformers.LlamaForCausalLM(hf_config(vocab_size, tok.bos_id, tok.eos_id))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d parameters", n_params)
    t0 = time.monotonic()
    history, tokens = train(model, tok, args.seed + 2, args.steps, BATCH, LR)
    t_train = time.monotonic() - t0
    eval_loss = held_out_loss(model, tok, args.seed + 1000)
    description = (f"trained by demo/train.py on stories from demo/grammar.py: {args.steps} steps "
                   f"of {BATCH}, {tokens} tokens, seed {args.seed}, held-out loss {eval_loss:.3f}")
    size = write_model(args.output, model, config, tok_md, description)
    answer = engine_answer(args.output, DEMO_PROMPT)
    last = np.mean([l for _, l in history[-20:]])
    print(f"tokenizer      {vocab_size} pieces, {t_tok:.1f} s")
    print(f"model          {n_params} parameters: dim {config.dim}, hidden {config.hidden_dim}, "
          f"{config.n_layers} layers, {config.n_heads} heads / {config.n_kv_heads} KV heads")
    print(f"training       {args.steps} steps x {BATCH}, {tokens} tokens in {t_train:.0f} s "
          f"({tokens / t_train:.0f} tok/s), last-20 loss {last:.3f}, held-out loss {eval_loss:.3f}")
    print(f"file           {args.output}: {size} bytes, sha256 {sha256(args.output)}")
    print(f"total          {time.monotonic() - t_start:.0f} s")
    print(f"[INST] {DEMO_PROMPT} [/INST]{answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
