"""Which AdamW steps the weights (pretrain/engine/optim.py adamw_kind): torch's fused AdamW, built by DeepSpeed itself
from the config a production stage gives it on a GPU, so no node compiles DeepSpeed's FusedAdam at the first step;
DeepSpeed's CPU Adam only where the optimizer is offloaded to the host."""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import REPO
from launch.rendezvous import free_port
from pretrain.config import load_stage_config
from pretrain.engine.optim import deepspeed_config

H_STAGE = REPO / "configs/internimage_h/in1k_640.yaml"


@pytest.mark.parametrize("on_gpu", [True, False])
def test_every_device_steps_with_torchs_fused_adamw(on_gpu):
    params = deepspeed_config(load_stage_config(H_STAGE), 1e-3, on_gpu, False)["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True


def test_an_offloaded_optimizer_is_deepspeeds_cpu_adam():
    """Without torch_adam DeepSpeed picks its CPU Adam for an offloaded optimizer (1.6x torch's fused on the host)."""
    cfg = load_stage_config(H_STAGE, ["zero.offload_optimizer=true"])
    params = deepspeed_config(cfg, 1e-3, True, False)["optimizer"]["params"]
    assert "torch_adam" not in params and "fused" not in params


def _rank(rank: int, port: int, out: str):
    import deepspeed

    from pretrain.engine.distributed import init_distributed, shutdown

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(timeout_s=60)  # a rank stuck in a collective fails the test instead of hanging it
    cfg = load_stage_config(H_STAGE, ["precision=fp32", "batch_size=4", "optim.grad_accumulation=1"])
    config = deepspeed_config(cfg, 1e-2, True, False)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    twin = torch.nn.Linear(8, 4)
    twin.load_state_dict(model.state_dict())
    start = model.weight.detach().clone()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    x = torch.randn(4, 8)
    for _ in range(3):
        engine.backward(engine(x).square().mean())
        engine.step()
        reference.zero_grad()
        twin(x).square().mean().backward()
        reference.step()
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        difference = max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters()))
        moved = (model.weight - start).abs().max().item()
    json.dump({"optimizer": type(engine.basic_optimizer).__qualname__,
               "fused": engine.basic_optimizer.defaults.get("fused"), "difference": difference, "moved": moved},
              open(out, "w"))
    shutdown()


def test_deepspeed_builds_the_fused_adamw_and_it_steps_as_torchs_adamw(tmp_path):
    """The production stage's own optimizer section, handed to DeepSpeed (ZeRO-3): the optimizer it builds is torch's
    AdamW with fused=True, and three steps leave the weights where torch's unfused AdamW with the stage's
    hyper-parameters leaves them."""
    out = tmp_path / "result.json"
    mp.spawn(_rank, args=(free_port(), str(out)), nprocs=1)
    result = json.loads(out.read_text())
    assert (result["optimizer"], result["fused"]) == ("AdamW", True)
    assert result["difference"] < 1e-6 and result["moved"] > 1e-3
