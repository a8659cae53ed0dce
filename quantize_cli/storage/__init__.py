"""The one layer that owns safetensors bytes: headers, reading, streaming atomic writes,
and sharded checkpoints."""
