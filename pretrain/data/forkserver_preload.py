"""Imported by the DataLoader workers' forkserver (loader.worker_context) before it forks any worker, and nowhere else:
what it loads here every worker has from the start, copy-on-write, instead of loading it at each start."""
from pretrain.data import loader  # noqa: F401 (for what it imports: torch, webdataset, PIL, timm's transforms)
from pretrain.data.tokenizer import clip_bpe

clip_bpe()
