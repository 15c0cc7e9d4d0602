"""The stage's `precision` (and `pretrain consolidate --dtype`) as torch dtypes: the config names them without torch."""
import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
