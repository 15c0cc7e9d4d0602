"""tools/gpu_check.py, proven on CPU: its smoke mode (--device cpu) runs every part end to end at tiny sizes (the real
engine in bf16 with a SIGKILL and a resume, the InternImage-H step loops and their profile, the DCNv3 benchmark), and
its report is checked field by field; its parsers are checked on made-up inputs."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu_check")
    out = work / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools/gpu_check.py"), "--device", "cpu", "--work",
                           str(work), "--out", str(out)], capture_output=True, text=True, timeout=1200, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, json.loads(out.read_text())


@pytest.mark.gpu_check_smoke
def test_smoke_run_passes_every_part(smoke):
    proc, report = smoke
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert report["passed"] and report["failures"] == []
    assert list(report["parts"]) == ["build", "tests", "engine", "dcnv3", "h"]
    assert all(part["status"] == "passed" and part["checks"] for part in report["parts"].values())
    assert report["machine"]["torch"] and report["machine"]["deepspeed"]
    assert "gpu_check: all checks passed" in proc.stdout


@pytest.mark.gpu_check_smoke
def test_smoke_engine_trains_and_resumes_exactly(smoke):
    engine = smoke[1]["parts"]["engine"]["figures"]
    bf16 = engine["bf16"]
    assert len(bf16["losses"]) == 8 and bf16["overflow_steps"] == 0 and bf16["loss_scales"] == [1.0] * 8
    assert bf16["engine"] == {"optimizer": "AdamW", "zero_stage": 3, "backend": "gloo", "device": "cpu",
                              "param_dtype": "bfloat16"}
    assert bf16["last_third_mean"] < bf16["first_third_mean"]
    # CPU runs are deterministic: the resumed steps repeat the uninterrupted run's losses bit for bit.
    assert engine["resume"]["steps"] == [5, 6, 7, 8]
    assert engine["resume"]["bit_identical"] and engine["resume"]["max_relative_difference"] == 0.0


@pytest.mark.gpu_check_smoke
def test_smoke_step_loops_report_throughput_memory_and_profile(smoke):
    h = smoke[1]["parts"]["h"]["figures"]
    for loop, task in (("finetune", "classification"), ("image_text", "image-text")):
        figures = h[loop]
        assert figures["task"] == task and figures["model"] == "internimage_h" and figures["precision"] == "bf16"
        assert figures["activation_checkpointing"] and figures["zero_stage"] == 3
        assert figures["samples_per_s"] > 0 and figures["flops_per_sample"] > 0
        achieved = figures["flops_per_sample"] * figures["samples_per_s"] / 1e12
        assert figures["tflops_per_device"] == pytest.approx(achieved)
        assert figures["mfu"] is None  # no peak rate for a CPU
        assert figures["estimate"]["total_gib"] > 0 and figures["peak_memory_gib"]["allocated"] > 0
        assert len(figures["losses"]) == 2 and figures["losses_finite"]
    profile = h["finetune"]["profile"]
    assert profile["events"] > 0 and 0 < profile["busy_fraction"] <= 1
    assert 0 < profile["dcnv3_share"] < 1 and len(profile["top"]) == 10
    assert h["image_text"]["profile"] is None


@pytest.mark.gpu_check_smoke
def test_smoke_benchmark_and_tests(smoke):
    parts = smoke[1]["parts"]
    rows = parts["dcnv3"]["figures"]["rows"]
    assert [(r["pass"], r["dtype"]) for r in rows] == [("fwd", "float32"), ("fwd+bwd", "float32")]
    assert all(r["ours_ms"] > 0 and r["speedup_vs_reference"] > 0 for r in rows)
    counts = parts["tests"]["figures"]["counts"]
    assert counts["failed"] == 0 and counts["skipped"] > 0  # the GPU tests skip here


def test_summarize_trace_measures_busy_time_gaps_and_dcnv3_share():
    loop = load_tool("gpu_step_loop")
    events = [{"ph": "X", "cat": "kernel", "name": "void dcnv3::forward_kernel<float, 4>", "ts": 0.0, "dur": 300.0},
              {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 200.0, "dur": 200.0},  # overlaps the first
              {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 900.0, "dur": 100.0},
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 5000.0}]  # not device work
    summary = loop.summarize_trace({"traceEvents": events}, "cuda", steps=2)
    assert summary["events"] == 3 and summary["span_ms_per_step"] == pytest.approx(0.5)
    assert summary["busy_fraction"] == pytest.approx(0.5) and summary["idle_ms_per_step"] == pytest.approx(0.25)
    assert summary["gaps_over_100us"] == 1 and summary["largest_gaps_ms"] == [pytest.approx(0.5)]
    assert summary["dcnv3_share"] == pytest.approx(0.5)
    assert [(k["name"], k["calls"]) for k in summary["top"]] == [("void dcnv3::forward_kernel<float, 4>", 1),
                                                                 ("gemm", 2)]


def test_junit_outcomes_tell_xfail_from_skip_and_failure(tmp_path):
    check = load_tool("gpu_check")
    xml = tmp_path / "junit.xml"
    xml.write_text("""<testsuites><testsuite>
        <testcase classname="t" name="a"/>
        <testcase classname="t" name="b"><skipped type="pytest.skip" message="no CUDA device"/></testcase>
        <testcase classname="t" name="c"><skipped type="pytest.xfail" message="float atomics"/></testcase>
        <testcase classname="t" name="d"><failure message="assert 1 == 2"/></testcase>
        </testsuite></testsuites>""")
    assert [(c["id"], c["outcome"], c["message"]) for c in check.junit_cases(xml)] == [
        ("t::a", "passed", ""), ("t::b", "skipped", "no CUDA device"), ("t::c", "xfailed", "float atomics"),
        ("t::d", "failed", "assert 1 == 2")]


def test_unknown_part_is_refused():
    proc = subprocess.run([sys.executable, str(REPO / "tools/gpu_check.py"), "--device", "cpu", "--only", "engin"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0 and "unknown parts ['engin']" in proc.stderr
