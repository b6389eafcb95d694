"""On-disk formats: Hugging Face safetensors reading and the dsjax FP4 shard store."""
