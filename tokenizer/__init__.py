"""Tokenizers rebuilt from model metadata (SentencePiece, Llama 3 byte-level BPE), the check
that they fit the model, chat templates, and UTF-8-safe streaming detokenization.

    tok = load_tokenizer(metadata, vocab_size, tokenizer_path=None)
    ids = tok.encode("Hello")                 # BOS first by the model's default
    text = tok.decode(ids)
    prompt = tok.chat_template.render([{"role": "user", "content": "Hi"}])
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    d = StreamDecoder(tok); text = "".join(d.push(i) for i in ids) + d.flush()
"""
from dllama_node.tokenizer.base import Tokenizer
from dllama_node.tokenizer.chat import ChatTemplate, chat_template_by_name
from dllama_node.tokenizer.dllama_t import read_dllama_t, write_dllama_t
from dllama_node.tokenizer.loader import load_tokenizer, tokenizer_from_vocab
from dllama_node.tokenizer.stream import StreamDecoder

__all__ = ["Tokenizer", "ChatTemplate", "StreamDecoder", "chat_template_by_name", "load_tokenizer",
           "read_dllama_t", "tokenizer_from_vocab", "write_dllama_t"]
