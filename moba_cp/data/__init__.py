"""Data: tokenizers, ``prepare-data``, the embedded stdlib corpus, Megatron GPT datasets."""
