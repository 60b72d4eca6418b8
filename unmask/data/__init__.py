"""Data: corpora (embedded stdlib, local files, `hf:` datasets), the tokenizer, packing and the token
cache, prompt sets, instruction pairs and their templates."""
