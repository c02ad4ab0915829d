"""Data: token sources with checkpointable positions, synthetic reasoning tasks, packing, tokenizers."""
