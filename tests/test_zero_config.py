"""The typed zero: section reaches DeepSpeed as DeepSpeed itself parses it: the engine's config (bucket sizes,
persistence, sub-groups, the gradients' communication dtype) and zero.Init's (where the parameters live from the
start)."""
from contextlib import nullcontext
from types import SimpleNamespace

import deepspeed
import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig

from conftest import CONFIG, REPO
from pretrain.config import load_stage_config
from pretrain.engine.config_checks import check_config
from pretrain.engine.optim import deepspeed_config
from pretrain.engine.trainer import build_model
from pretrain.typed_config import ConfigError

H_STAGE = REPO / "configs/internimage_h/in1k_640.yaml"


def parsed(cfg, on_gpu=True) -> DeepSpeedConfig:
    return DeepSpeedConfig(deepspeed_config(cfg, 1e-3, on_gpu, False))


def test_defaults_reach_deepspeed_gradients_reduced_in_fp32():
    config = parsed(load_stage_config(H_STAGE))
    zero = config.zero_config
    assert (zero.reduce_bucket_size, zero.prefetch_bucket_size, zero.max_live_parameters,
            zero.param_persistence_threshold, zero.sub_group_size) == (2e8, 2e8, 1e9, 1e5, 1e8)
    assert config.bfloat16_config.enabled and config.communication_data_type == torch.float32


def test_each_knob_reaches_deepspeed():
    cfg = load_stage_config(H_STAGE, ["zero.reduce_bucket_size=11", "zero.stage3_prefetch_bucket_size=12",
                                      "zero.stage3_max_live_parameters=13", "zero.stage3_param_persistence_threshold=14",
                                      "zero.sub_group_size=15", "zero.communication_data_type=bf16"])
    config = parsed(cfg)
    zero = config.zero_config
    assert (zero.reduce_bucket_size, zero.prefetch_bucket_size, zero.max_live_parameters,
            zero.param_persistence_threshold, zero.sub_group_size) == (11, 12, 13, 14, 15)
    assert config.communication_data_type == torch.bfloat16


@pytest.mark.parametrize("override, message", [("zero.reduce_bucket_size=0", "zero.reduce_bucket_size must be > 0"),
                                               ("zero.communication_data_type=fp8", "not one of")])
def test_bad_zero_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_stage_config(H_STAGE, [override])


def test_offload_params_reaches_zero_init(monkeypatch):
    """zero.Init puts the partitions where its own config's offload_param says, so the model is never built on the
    GPU; the recorded config is parsed as zero.Init parses it."""
    given = {}
    monkeypatch.setattr(deepspeed.zero, "Init", lambda config_dict_or_path: given.update(config_dict_or_path)
                        or nullcontext())
    cfg = load_stage_config(CONFIG, ["zero.offload_params=true"])
    build_model(SimpleNamespace(build=lambda zero_init: torch.nn.Linear(2, 2)), cfg, torch.float32, torch.device("cpu"))
    offload = DeepSpeedConfig(given).zero_config.offload_param
    assert offload is not None and (offload.device, offload.pin_memory) == ("cpu", False)


def test_extra_keys_reach_deepspeed_as_written():
    cfg = check_config(CONFIG, ["zero.extra={overlap_comm: false, stage3_max_reuse_distance: 5}"])
    zero = parsed(cfg).zero_config
    assert (zero.overlap_comm, zero.max_reuse_distance, zero.sub_group_size) == (False, 5, 1e8)


@pytest.mark.parametrize("extra, message", [
    ("{overlap_comms: true}", "zero: DeepSpeed refuses its zero_optimization section: overlap_comms: Extra inputs are "
                              "not permitted"),
    ("{overlap_comm: maybe}", "overlap_comm: Input should be a valid boolean"),
    ("{sub_group_size: 5}", r"zero.extra: \['sub_group_size'\] set by the zero: section itself"),
    ("{prefetch_bucket_size: 5}", r"zero.extra: \['prefetch_bucket_size'\] are DeepSpeed's other names for "
                                  r"\['stage3_prefetch_bucket_size'\], which the zero: section sets itself"),
])
def test_a_bad_extra_key_is_one_line_before_any_rank(extra, message):
    with pytest.raises(ConfigError, match=message):
        check_config(CONFIG, [f"zero.extra={extra}"])
