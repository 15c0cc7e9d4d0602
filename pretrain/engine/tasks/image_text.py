"""Image-text contrastive pretraining: a CLIP-style dual encoder (InternImage vision tower, open_clip's text
transformer), symmetric InfoNCE with a learnable temperature, features gathered across ranks with gradients, each rank
scoring only its own rows against the global batch (open_clip's local loss: memory linear in the batch).
Metric: zero-shot top-1 on labelled shards, each class scored by its captions' mean embedding."""
import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.engine.distributed import sum_over_ranks
from pretrain.engine.tasks.base import Task, build_vision_tower, lockstep


class ImageTextModel(nn.Module):
    def __init__(self, visual: nn.Module, text: nn.Module):
        super().__init__()
        self.visual, self.text = visual, text
        # Shape (1,), not a scalar: ZeRO-3 cannot partition 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))

    def encode_image(self, image):
        return F.normalize(self.visual(image), dim=-1)

    def encode_text(self, tokens):
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, image, tokens):
        # CLIP clamps the temperature so logits stay below 100.
        return self.encode_image(image), self.encode_text(tokens), self.logit_scale.clamp(max=math.log(100)).exp()


class ImageTextTask(Task):
    name = "image-text"
    train_samples = "image-text"
    backbone_prefix = "visual."
    summary = {"zero_shot_top1": "zero_shot_top1"}

    def __init__(self, cfg, world):
        from open_clip.loss import ClipLoss

        super().__init__(cfg, world)
        self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
                                rank=world.rank, world_size=world.size)

    def build(self, zero_init=nullcontext()):
        from open_clip.transformer import TextTransformer

        text = self.cfg.text
        visual = build_vision_tower(self.cfg, text.embed_dim, zero_init)
        # The text tower is small next to a 1B+ vision tower; it is built whole (same seed on every rank) and
        # partitioned by deepspeed.initialize, which keeps open_clip's own initialisation intact.
        tower = TextTransformer(context_length=self.cfg.data.context_length, vocab_size=text.vocab_size,
                                width=text.width, heads=text.heads, layers=text.layers, output_dim=text.embed_dim)
        return ImageTextModel(visual, tower)

    def example_inputs(self, batch_size):
        return (*super().example_inputs(batch_size),
                torch.zeros(batch_size, self.cfg.data.context_length, dtype=torch.long))

    def loss(self, model, batch, dtype):
        image_features, text_features, logit_scale = model(batch["image"].to(dtype), batch["text"])
        return self.loss_fn(image_features, text_features, logit_scale), {"logit_scale": logit_scale.detach()}

    @torch.no_grad()
    def evaluate(self, model, loader, dtype):
        from pretrain.data import get_tokenizer, zero_shot_classes

        class_names, templates = zero_shot_classes()
        tokenizer = get_tokenizer(self.cfg.data.context_length)
        device = self.world.device
        classifier = []
        for name in class_names:
            tokens = tokenizer([t.format(name) for t in templates]).to(device)
            classifier.append(F.normalize(model.encode_text(tokens).float().mean(0), dim=-1))
        classifier = torch.stack(classifier, 1)
        correct = total = 0
        for batch in lockstep(loader, self.world):
            logits = model.encode_image(batch["image"].to(device, dtype)).float() @ classifier
            if batch["real"]:
                correct += (logits.argmax(-1).cpu() == batch["label"]).sum().item()
                total += len(batch["label"])
        counts = sum_over_ranks({"correct": correct, "total": total}, device)
        return {"zero_shot_top1": counts["correct"] / max(1, counts["total"]), "eval_samples": int(counts["total"])}
