"""Models: the transformer backbone and its attention masks, the KV cache, the soft-mask and ADJUST
sampler modules, and checkpoints on disk."""
