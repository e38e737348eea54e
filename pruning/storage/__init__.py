"""Files on disk: safetensors headers and weight files (``weight_files``), one-tensor-at-a-time
shards (``shards``), file pages given back (``file_pages``), filesystem primitives (``fs``) and
atomic JSON (``json_files``). Nothing here knows about models."""
