"""Webdataset pipelines for image-text pretraining and classification fine-tuning.

Interface for the training engine:

    cfg = DataConfig(**yaml["data"])                  # or data_config_from_dict(...); unknown keys raise
    loader = build_train_loader(cfg, rank=r, world_size=w, batch_size=b, seed=s)
    loader.load_state_dict(ckpt["data"])              # per rank; optional
    for step, batch in zip(range(start, total), loader):   # endless, epoch after epoch
        batch["image"]    # float (B, 3, H, W), normalised
        batch["text"]     # long (B, context_length)      -- data.format "image-text"
        batch["label"]    # long (B,)                      -- data.format "classification"
        batch["skipped"]  # {reason: count} since the previous batch (from the worker): bad samples skipped, and
                          # samples kept but altered (reasons in stats.NOT_SKIPS; stats.skipped_total counts skips only)
        ckpt["data"] = loader.state_dict()            # position after this batch; save every rank's own
    loader.steps_per_epoch, loader.epoch

    build_eval_loader(cfg, rank=r, world_size=w, batch_size=b)  # finite; each val sample once across ranks
    build_mixup(cfg, num_classes, seed=s)             # BatchMixup (images, labels) -> (images, soft targets), or None
    get_tokenizer(context_length)                     # CLIP BPE, tokenizer(list_of_texts) -> (N, context_length)
    zero_shot_classes()                               # demo: (class names, prompt templates)
    ensure_demo_shards(root)                          # demo: {format: {"train"|"val": pattern}}

A resumed loader yields exactly the batches the uninterrupted one would have (see loader.py for how). Workers start
from a forkserver (loader.py), so a script that builds loaders must guard its top level with
`if __name__ == "__main__":`, as multiprocessing requires. What one shard may cost is bounded by data.limits (tars.py).
"""
from pretrain.data.config import Augment, DataConfig, Limits, Source, data_config_from_dict
from pretrain.data.demo import ensure_demo_shards, zero_shot_classes
from pretrain.data.loader import TrainLoader, build_eval_loader, build_train_loader
from pretrain.data.mixup import build_mixup
from pretrain.data.tokenizer import get_tokenizer

__all__ = ["Augment", "DataConfig", "Limits", "Source", "data_config_from_dict", "ensure_demo_shards",
           "zero_shot_classes", "TrainLoader", "build_train_loader", "build_eval_loader", "build_mixup", "get_tokenizer"]
