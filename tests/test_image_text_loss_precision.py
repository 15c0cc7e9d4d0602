"""The contrastive loss runs in fp32 whatever the stage's precision: features and temperature are cast before it."""
import math
from types import SimpleNamespace

import torch
import torch.nn as nn

from pretrain.engine.tasks.image_text import ImageTextModel, ImageTextTask


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


def test_a_bf16_model_exponentiates_its_temperature_in_fp32():
    model = ImageTextModel(nn.Linear(4, 4), nn.Linear(4, 4)).bfloat16()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))  # rounded to bf16: exp() of it in bf16 would round again
    inputs = torch.ones(2, 4, dtype=torch.bfloat16)
    _, _, scale = model(inputs, inputs)
    assert scale.dtype == torch.float32
    assert torch.equal(scale, model.logit_scale.detach().float().exp())
    assert not torch.equal(scale, model.logit_scale.detach().exp().float())
