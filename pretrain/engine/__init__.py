"""The training engine: `run_stage` runs or resumes one stage on this rank; `request_stop` asks for a coordinated
checkpoint and exit; `consolidate` turns a DeepSpeed checkpoint into fp16/bf16/fp32 backbone weights; `check_config`
validates a stage config and the files it names before any rank starts."""
from pretrain.engine.config_checks import check_config
from pretrain.engine.consolidate import consolidate
from pretrain.engine.preemption import request_stop
from pretrain.engine.trainer import run_stage

__all__ = ["check_config", "consolidate", "request_stop", "run_stage"]
