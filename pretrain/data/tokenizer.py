"""Caption tokenisation with open_clip's CLIP BPE tokenizer, which ships its vocabulary (works offline)."""
import functools

import torch
from open_clip.tokenizer import SimpleTokenizer


@functools.cache
def clip_bpe() -> SimpleTokenizer:
    """The vocabulary and merges, loaded once per process (0.1-1 s); the workers' forkserver loads it before forking."""
    return SimpleTokenizer()


class Tokenizer:
    """`tokenizer(texts) -> LongTensor (N, context_length)`. Pickles as its context length alone (the vocabulary
    would be 2 MB to pickle for every worker start): a worker uses the vocabulary of its own process."""

    def __init__(self, context_length: int):
        self.context_length = context_length

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        return clip_bpe()(texts, context_length=self.context_length)


@functools.lru_cache(maxsize=None)
def get_tokenizer(context_length: int = 77) -> Tokenizer:
    return Tokenizer(context_length)
