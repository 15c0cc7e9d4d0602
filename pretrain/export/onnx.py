"""InternImage -> ONNX with a dynamic batch, checked in onnxruntime.

DCNv3 is exported as its pure-PyTorch definition (pretrain/ops/reference.py): a GridSample of the value map at the
deformed points and a weighted sum, standard ONNX ops since opset 16. So every runtime runs the file as it is
(onnxruntime on any provider, TensorRT, OpenVINO), where a custom-op domain would need our kernel built into each of
them (onnxruntime has no DCNv3 op and the release's TensorRT plugin is missing). The cost: the graph materialises
every sampled point, as the reference does, instead of the fused kernel's single pass.

The TorchScript exporter is used: the dynamo exporter gives the same graph but takes ~10x longer on InternImage-T
(15 s against 140 s here), and the operator's shape checks become guards it has to prove."""
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from pretrain.ops import default_backend

OPSET = 17  # >= 16 for GridSample; 17 has LayerNormalization, one node instead of seven per norm


class StageOutputs(nn.Module):
    """The four stage outputs (N, C_i, H/2^(i+2), W/2^(i+2)) that detection and segmentation necks take."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model.forward_stages(x))


def output_names(model: nn.Module, stages: bool) -> list[str]:
    return [f"stage{i + 1}" for i in range(len(model.levels))] if stages else ["output"]


def export_onnx(model: nn.Module, path: str | Path, image_size: int, stages: bool = False) -> list[str]:
    """Write `model` (fp32, eval) to `path`: input `image` (batch, 3, image_size, image_size), outputs the head's
    (logits, or the image-text embedding before normalisation) or, with `stages`, the four stage maps."""
    names = output_names(model, stages)
    module = StageOutputs(model) if stages else model
    example = torch.zeros(2, 3, image_size, image_size)  # batch 2: a batch of 1 could be specialised away
    dynamic = {name: {0: "batch"} for name in ["image", *names]}
    with default_backend("reference"), torch.no_grad(), warnings.catch_warnings():
        # The operator's argument checks compare traced shapes with Python values: they hold for the example, and
        # being checks, put nothing into the graph.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=names, dynamic_axes=dynamic)
    return names


def relative_error(model: nn.Module, path: str | Path, batches: list[torch.Tensor], stages: bool = False) -> float:
    """The largest |onnxruntime - PyTorch| over the largest |PyTorch|, over every output of every batch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors = []
    for images in batches:
        with torch.no_grad():
            expected = model.forward_stages(images) if stages else [model(images)]
        got = session.run(None, {"image": images.numpy()})
        errors += [float((torch.from_numpy(g) - e).abs().max() / e.abs().max()) for g, e in zip(got, expected)]
    return max(errors)
