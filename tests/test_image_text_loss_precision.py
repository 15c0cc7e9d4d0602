"""The contrastive loss runs in fp32 whatever the stage's precision: features and temperature are cast before it."""
from types import SimpleNamespace

import torch

from pretrain.engine.tasks.image_text import ImageTextTask


def test_contrastive_loss_receives_fp32_features_from_a_bf16_model():
    received = []

    def loss_fn(image_features, text_features, logit_scale):
        received.extend(t.dtype for t in (image_features, text_features, logit_scale))
        return (image_features @ text_features.T * logit_scale).sum()

    def bf16_model(image, text):
        return torch.ones(2, 4, dtype=image.dtype), torch.ones(2, 4, dtype=image.dtype), torch.ones(1, dtype=image.dtype)

    batch = {"image": torch.zeros(2, 3, 8, 8), "text": torch.zeros(2, 5, dtype=torch.long)}
    loss, _ = ImageTextTask.loss(SimpleNamespace(loss_fn=loss_fn), bf16_model, batch, torch.bfloat16)
    assert received == [torch.float32] * 3
    assert loss.dtype == torch.float32
