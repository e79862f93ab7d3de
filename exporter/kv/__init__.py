"""KV-cache arithmetic for llama.cpp b11434: GGUF metadata, cache geometry and llama-server args."""
