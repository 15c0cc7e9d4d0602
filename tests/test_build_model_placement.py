"""Under ZeRO-3 build_model puts every buffer of the task's model on the run's device and every parameter in the run's
precision: DeepSpeed skips module.to(device) for a model zero.Init touched and moves only its parameters (to the device,
when it partitions them), so a buffer built outside zero.Init (open_clip's attention mask) would stay on the CPU. The
meta device stands in for the GPU; zero.Init is replaced, as it needs a process group and places only what it builds
(tests/test_engine_precision.py runs the whole path through deepspeed.initialize)."""
from contextlib import nullcontext

import deepspeed
import torch

from conftest import CONFIG
from pretrain.config import load_stage_config
from pretrain.engine.distributed import World
from pretrain.engine.tasks import build_task
from pretrain.engine.trainer import build_model


def test_every_buffer_of_the_image_text_model_is_on_the_device_and_every_parameter_in_the_runs_precision(monkeypatch):
    monkeypatch.setattr(deepspeed.zero, "Init", lambda **kwargs: nullcontext())
    cfg = load_stage_config(CONFIG, ["precision=bf16"])
    task = build_task(cfg, World(rank=0, size=1, local_rank=0, device=torch.device("cpu")))
    model = build_model(task, cfg, torch.bfloat16, torch.device("meta"))
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    assert "text.attn_mask" in buffers and "text.token_embedding.weight" in params and "logit_scale" in params
    assert {name for name, buffer in buffers.items() if buffer.device.type != "meta"} == set()
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert buffers["text.attn_mask"].dtype == torch.float32  # DeepSpeed leaves buffers' dtype; open_clip casts it
