"""What DeepSpeed ZeRO-3 does to a parameter, asked in one place. A partitioned parameter carries DeepSpeed's `ds_id`;
its `shape` is an empty placeholder (the full one is `ds_shape`), and writing it needs it gathered whole first."""
import contextlib

import torch


def is_partitioned(param) -> bool:
    return hasattr(param, "ds_id")


def full_shape(param):
    return param.ds_shape if is_partitioned(param) else param.shape


def gathered_for_writing(params: list) -> contextlib.AbstractContextManager:
    """The partitioned ones among `params` gathered whole, and what rank 0 writes into them partitioned again on exit;
    nothing to do for plain parameters (DeepSpeed is imported only when some are partitioned)."""
    partitioned = [param for param in params if is_partitioned(param)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


def set_fp32_master(param, value: torch.Tensor):
    """Write `value` as it is into the optimizer's fp32 master of `param`, where deepspeed.initialize made one (ZeRO,
    the bf16 optimizer); nothing to do for a parameter that is its own master. Under ZeRO-3 each rank writes its own
    partition: DeepSpeed's safe_set_full_fp32_param cuts the last rank's short where the partitions are padded."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    if not is_partitioned(param):
        safe_set_full_fp32_param(param, value)
        return
    import torch.distributed as dist

    size = param.partition_numel()
    start = size * dist.get_rank(group=param.ds_process_group)
    part = value.detach().flatten()[start:start + size]  # past the end: padding
    safe_set_local_fp32_param(param, torch.nn.functional.pad(part, (0, size - part.numel())))
