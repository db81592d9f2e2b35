"""Tokenizers rebuilt from model metadata (SentencePiece, Llama 3 byte-level BPE) and chat templates."""
