"""`model.compile`: torch.compile applied layer by layer, the way it works under DeepSpeed ZeRO-3.

ZeRO-3 hooks every module to gather its parameters before its forward, and those hooks are `torch.compiler.disable`d:
a compiled model (or DeepSpeed's `engine.compile()`, which compiles the whole module) breaks its graph at each of
them, a few ops per graph. Each InternImage layer is instead made a ZeRO-3 leaf, whose one hook gathers the whole
layer's parameters and whose children carry none, and the layer's body runs compiled inside that hook: one graph per
layer with DCNv3 as one `pretrain::dcnv3` op (its fake kernel gives dynamo the shapes). Layers of a stage share their
graph (parameters are graph inputs), so a model compiles once per stage; the stem, downsamples and head stay eager.
"""
import torch

from pretrain.models.internimage import InternImageLayer


def compile_layers(model: torch.nn.Module) -> list[InternImageLayer]:
    """Before deepspeed.initialize, which registers the hooks: the leaf flag decides where they go."""
    from deepspeed.utils import set_z3_leaf_modules

    layers = set_z3_leaf_modules(model, [InternImageLayer])
    for layer in layers:
        # Static shapes: inductor's dynamic-shape path fails on these layers (a symbolic size it cannot order), and a
        # stage's shapes are fixed anyway. The hooks stay outside the compiled body, around the layer's forward.
        layer._forward = torch.compile(layer._forward, dynamic=False)
    return layers
