"""The testbed: a generated tiny GGUF model and a real llama-server serving it, for the demo and
the tests. Not part of the installed package."""
