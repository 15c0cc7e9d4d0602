"""An EMA of the weights that stays partitioned under ZeRO-3: each rank averages only the parameter shard it owns
(`param.ds_tensor`), so no step ever gathers the model. Two kinds of parameter are held whole instead: every
parameter without ZeRO-3, and ZeRO-3's persistent ones (<= the persistence threshold: norms, biases, depthwise convs),
which DeepSpeed keeps gathered in `param.data` on every rank and uses from there in the forward pass, so an EMA written
to their shard alone would never be evaluated.

The saved state names each parameter, its shape and whether it is a shard, so the whole EMA can be put together from
every rank's state (for export, or to re-split it over another world size) without the engine that saved it."""
from contextlib import contextmanager, nullcontext

import torch

from pretrain.zero3 import full_shape, is_partitioned


def is_shard(param) -> bool:
    """Whether the forward pass reads this parameter from ZeRO-3's partitions (gathered on demand)."""
    return is_partitioned(param) and not param.ds_persist


def _source(param) -> torch.Tensor:
    return param.ds_tensor if is_shard(param) else param.data


class PartitionedEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        # A persistent parameter is first gathered by the first forward pass; until then its data is a placeholder.
        with _gathered([p for p in self.params if is_partitioned(p) and not is_shard(p)]):
            self.shadow = [_source(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(_source(param).float(), 1 - self.decay)

    @contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights in the model (e.g. to evaluate them)."""
        saved = [_source(p).clone() for p in self.params]
        with torch.no_grad():
            for shadow, param in zip(self.shadow, self.params):
                _source(param).copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for original, param in zip(saved, self.params):
                    _source(param).copy_(original)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow, "names": self.names,
                "shapes": [list(full_shape(p)) for p in self.params], "sharded": [is_shard(p) for p in self.params]}

    def load_state_dict(self, state: dict):
        self.shadow = [t.clone() for t in state["shadow"]]

    def load_whole(self, weights: dict[str, torch.Tensor], rank: int):
        """Take this rank's part of a whole EMA (see `whole_ema`): after a change of world size."""
        missing = sorted(set(self.names) - set(weights))
        if missing:
            raise RuntimeError(f"the saved EMA has no weights for {missing[:3]} ({len(missing)} in all)")
        self.shadow = [_part(weights[name].float(), p, rank) for name, p in zip(self.names, self.params)]


def _gathered(params: list):
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _part(whole: torch.Tensor, param, rank: int) -> torch.Tensor:
    """ZeRO-3's partition of `whole` for `rank`: the flat tensor cut in equal pieces, the last one padded with zeros."""
    if not is_shard(param):
        return whole.clone()
    size = param.ds_tensor.numel()
    piece = whole.flatten()[rank * size:(rank + 1) * size]
    part = torch.zeros(size, dtype=torch.float32)
    part[:piece.numel()] = piece
    return part


def whole_ema(rank_states: list[dict]) -> dict[str, torch.Tensor]:
    """The whole EMA, by parameter name, from every rank's saved EMA state in rank order."""
    first = rank_states[0]
    if "names" not in first:
        raise RuntimeError("this checkpoint's EMA predates named EMA states; it can only resume on the same ranks")
    whole = {}
    for i, (name, shape, sharded) in enumerate(zip(first["names"], first["shapes"], first["sharded"])):
        if sharded:
            flat = torch.cat([state["shadow"][i].flatten() for state in rank_states])
            whole[name] = flat[:torch.Size(shape).numel()].view(shape).clone()
        else:
            whole[name] = first["shadow"][i].view(shape).clone()
    return whole
