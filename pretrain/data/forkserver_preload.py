"""Imported by the DataLoader workers' forkserver (loader.worker_context) before it forks any worker, and nowhere else:
what it loads here every worker has from the start, copy-on-write, instead of loading it at each start.

It also makes the forkserver ignore the stop signals, as the workers do (loader.ignore_stop_signals): SLURM sends them
to every process of a job step on preemption, and a forkserver that died of one would orphan the workers, whose
parent-process check then ends them while their rank still needs batches to reach its coordinated save."""
from pretrain.data import loader  # and with it what the workers import: torch, webdataset, PIL, timm's transforms
from pretrain.data.tokenizer import clip_bpe

loader.ignore_stop_signals(0)
clip_bpe()
