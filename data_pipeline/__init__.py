"""Data: shard writer, DALI input pipeline and its plain-PyTorch fallback."""
