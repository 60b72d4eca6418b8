"""Decoding: `generate()` (the one loop), its state, the decoder and its policies (proposals, scores,
selectors, input policies), ADJUST joint decoding, the named presets, and `sample()`."""
