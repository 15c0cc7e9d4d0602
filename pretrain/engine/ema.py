"""An EMA of the weights that stays partitioned under ZeRO-3: each rank averages only the parameter shard it owns
(`param.ds_tensor`), so no step ever gathers the model. Without ZeRO-3 every rank holds full parameters and
averages them all."""
from contextlib import contextmanager

import torch


def _local(param) -> torch.Tensor:
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class PartitionedEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [_local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(_local(param).float(), 1 - self.decay)

    @contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights in the model (e.g. to evaluate them)."""
        saved = [_local(p).clone() for p in self.params]
        with torch.no_grad():
            for shadow, param in zip(self.shadow, self.params):
                _local(param).copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for original, param in zip(saved, self.params):
                    _local(param).copy_(original)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict):
        self.shadow = [t.clone() for t in state["shadow"]]
