"""Caption tokenisation with open_clip's CLIP BPE tokenizer, which ships its vocabulary (works offline)."""
import functools

from open_clip.tokenizer import SimpleTokenizer


@functools.lru_cache(maxsize=None)
def get_tokenizer(context_length: int = 77) -> SimpleTokenizer:
    """`tokenizer(list_of_texts) -> LongTensor (N, context_length)`; cached, as loading the vocabulary takes ~1 s."""
    return SimpleTokenizer(context_length=context_length)
