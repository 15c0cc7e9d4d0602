"""What DeepSpeed ZeRO-3 does to a parameter, asked in one place. A partitioned parameter carries DeepSpeed's `ds_id`;
its `shape` is an empty placeholder (the full one is `ds_shape`), and writing it needs it gathered whole first."""
import contextlib


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
