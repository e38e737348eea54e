"""Exports of a saved checkpoint to other engines: GGUF for llama.cpp (``gguf``, ``gguf_vocab``, the
``cli``), and ``llamacpp``, the harness that runs a GGUF in llama.cpp itself to check it."""
