"""`model.compile`: each InternImage layer under torch.compile with inductor on the CPU, DCNv3 one custom op in its
graph, and a ZeRO-3 run whose losses are the eager run's."""
import json

import torch
from conftest import CONFIG, FAST, losses
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from pretrain.models import create_model
from pretrain.models.internimage import InternImageLayer

DEMO_ARGS = dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], level2_post_norm_block_ids=[0],
                 drop_path_rate=0.0)  # configs/demo/pretrain.yaml's model
# Every parameter partitioned (the demo's are all under the default threshold, which would keep them whole on every
# rank): the compiled layers then run on what ZeRO-3 gathers.
STAGE = [*FAST, "max_steps=4", "zero.stage3_param_persistence_threshold=0", "checkpoint.every=100",
         "model.activation_checkpointing=true"]  # as the H and G stages run


def demo_layer() -> InternImageLayer:
    torch.manual_seed(0)
    model = create_model("internimage_h", **DEMO_ARGS, num_classes=8)
    return next(module for module in model.modules() if isinstance(module, InternImageLayer))


def recording_backend(graphs: list):
    """AOT autograd's forward and backward graphs, in ATen ops, run as they are traced."""
    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return make_boxed_func(graph_module)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def custom_ops(graph_module) -> list[str]:
    return [str(node.target) for node in graph_module.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("pretrain.")]


def test_a_layer_compiles_to_one_graph_with_dcnv3_one_op_each_way():
    layer = demo_layer()
    x = torch.randn(2, 8, 8, 16, requires_grad=True)
    explained = torch._dynamo.explain(layer._forward)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons

    graphs = []
    compiled = torch.compile(layer._forward, backend=recording_backend(graphs), fullgraph=True, dynamic=False)
    compiled(x).square().sum().backward()
    forward, backward = graphs
    assert custom_ops(forward) == ["pretrain.dcnv3.default"]  # not the reference's grid_sample decomposition
    assert "aten.grid_sampler_2d.default" not in {str(node.target) for node in forward.graph.nodes}
    assert custom_ops(backward) == ["pretrain.dcnv3_backward.default"]


def test_a_compiled_layer_under_activation_checkpointing_recomputes_and_matches_eager():
    """with_cp wraps the compiled body in torch.utils.checkpoint: the backward runs the compiled forward again, and
    the gradients are eager's."""
    eager, checkpointed = demo_layer(), demo_layer()
    checkpointed.with_cp = True
    calls = []
    compiled = torch.compile(checkpointed._forward, dynamic=False)  # inductor, as model.compile uses it
    checkpointed._forward = lambda x: calls.append(x.shape) or compiled(x)
    x = torch.randn(2, 8, 8, 16)
    grads = []
    for layer in (eager, checkpointed):
        xi = x.clone().requires_grad_()
        layer(xi).square().sum().backward()
        grads.append([xi.grad, *(p.grad for p in layer.parameters())])
    assert len(calls) == 2  # the forward, and its recomputation in the backward
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)  # inductor orders its sums its own way


def test_compiled_zero3_run_matches_eager_losses(torchrun, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    torchrun("compiled_stage.py", CONFIG, f"run_dir={eager}", *STAGE)
    proc = torchrun("compiled_stage.py", CONFIG, f"run_dir={compiled}", *STAGE, "model.compile=true")
    dynamo = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("DYNAMO "))[7:])
    # one graph per stage of the vision tower (4 shapes), for training only (evaluation runs eager), and no break in
    # any: not one per ZeRO-3 hook
    assert dynamo == {"unique_graphs": 4, "graph_breaks": {}}
    eager_losses, compiled_losses = losses(eager), losses(compiled)
    assert sorted(compiled_losses) == [1, 2, 3, 4]
    for step, loss in eager_losses.items():
        assert abs(compiled_losses[step] - loss) < 1e-4 * abs(loss), (step, loss, compiled_losses[step])
