"""InternImage on a GPU: an InternImage-H layer under torch.compile (Inductor) against eager, and InternImage-H built
inside deepspeed.zero.Init on the device. Skipped without a GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SCRIPTS, free_port
from pretrain.models.internimage import InternImageLayer
from test_dcnv3_cpu import relative_error

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
H_PARAMETERS = 1_089_636_760


def h_layer(channels=64, group=4):
    """A layer with H's residual form (res-post-norm) and DCN options (center feature scale, 5x5 depthwise conv)."""
    return InternImageLayer(channels, group, mlp_ratio=4.0, drop_path=0.0, layer_scale=None, post_norm=False,
                            res_post_norm=True, offset_scale=1.0, dw_kernel_size=5, center_feature_scale=True,
                            remove_center=False, with_cp=False, device="cuda")


@needs_gpu
def test_compiled_layer_matches_eager():
    torch.manual_seed(0)
    layer = h_layer()
    with torch.no_grad():  # non-zero offsets and mask logits, so the sampling is not the plain grid of the init
        for linear in (layer.dcn.offset, layer.dcn.mask):
            linear.weight.normal_(0, 0.05)
    x = torch.randn(4, 28, 28, 64, device="cuda", requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    results = []
    for module in (layer, compiled):
        out = module(x)
        grads = torch.autograd.grad(out.square().sum(), [x, layer.dcn.offset.weight, layer.mlp.fc1.weight])
        results.append((out, *grads))
    for name, eager, fused in zip(("output", "input", "offset weight", "fc1 weight"), *results):
        assert relative_error(fused, eager) < 1e-4, name


@needs_gpu
def test_zero_init_builds_h_partitioned_on_the_gpu():
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(SCRIPTS / "zero_init_cuda.py")], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["total"] == H_PARAMETERS
    assert report["devices"] == ["cuda:0"] and report["dtypes"] == ["torch.bfloat16"]
    assert report["max_materialised"] == 0  # every parameter a placeholder outside its gather
    # Construction never held the model in fp32 (4.4 GB): bf16 partitions (2.2 GB) plus one module at a time.
    assert report["peak_gib"] < 1.25 * H_PARAMETERS * 2 / 2**30
    assert report["offset_abs_max"] == 0.0 and report["norm_weight_mean"] == 1.0
