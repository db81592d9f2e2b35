"""Model files: GGUF and distributed-llama .m, read through a memmap as zero-copy views."""
