"""Webdataset pipelines for image-text pretraining and classification fine-tuning.

Interface for the training engine:

    cfg = DataConfig(**yaml["data"])                  # or data_config_from_dict(...); unknown keys raise
    loader = build_train_loader(cfg, rank=r, world_size=w, batch_size=b, seed=s)
    loader.load_state_dict(ckpt["data"])              # per rank; optional
    for step, batch in zip(range(start, total), loader):   # endless, epoch after epoch
        batch["image"]    # uint8 (B, 3, H, W): DeviceBatch moves it to the device, converts and normalises it there
        batch["text"]     # long (B, context_length)      -- data.format "image-text"
        batch["label"]    # long (B,)                      -- data.format "classification"
        batch["skipped"]  # {reason: count} since the previous batch (from the worker): bad samples skipped, and
                          # samples kept but altered (reasons in stats.NOT_SKIPS; stats.skipped_total counts skips only)
        ckpt["data"] = loader.state_dict()            # position after this batch; save every rank's own
    loader.steps_per_epoch, loader.epoch

    build_eval_loader(cfg, rank=r, world_size=w, batch_size=b)  # finite; each val sample once across ranks
    DeviceBatch(cfg, device, training)(batch)         # the batch on the device, "image" float and normalised (and
                                                      # randomly erased in training, data.augment.random_erasing)
    DeviceLoader(eval_loader, DeviceBatch(...))       # evaluation batches with their images so prepared
    build_mixup(cfg, num_classes, seed=s)             # BatchMixup (images, labels) -> (images, soft targets), or None
    get_tokenizer(context_length)                     # CLIP BPE, tokenizer(list_of_texts) -> (N, context_length)
    zero_shot_classes()                               # demo: (class names, prompt templates)
    ensure_demo_shards(root)                          # demo: {format: {"train"|"val": pattern}}

A resumed loader yields exactly the batches the uninterrupted one would have (see loader.py for how). Workers start
from a forkserver (loader.py), so a script that builds loaders must guard its top level with
`if __name__ == "__main__":`, as multiprocessing requires. What one shard may cost is bounded by data.limits (tars.py).
"""
import importlib

_HOMES = {  # each name of the interface -> its module, imported on first use (PEP 562): the stage config reads
    # pretrain.data.config without the loaders' torch, webdataset and PIL
    **dict.fromkeys(["Augment", "DataConfig", "Limits", "Source", "data_config_from_dict"], "pretrain.data.config"),
    **dict.fromkeys(["ensure_demo_shards", "zero_shot_classes"], "pretrain.data.demo"),
    **dict.fromkeys(["TrainLoader", "build_eval_loader", "build_train_loader"], "pretrain.data.loader"),
    **dict.fromkeys(["DeviceBatch", "DeviceLoader"], "pretrain.data.device_batch"),
    "build_mixup": "pretrain.data.mixup",
    "get_tokenizer": "pretrain.data.tokenizer",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
