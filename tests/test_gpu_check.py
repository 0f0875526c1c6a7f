"""bench/gpu_check.py, the one-shot GPU check, in its CPU smoke mode: every section runs on tiny shapes and
passes, and the JSON it writes has the shape the GPU run will have."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
SECTIONS = ["a_parity", "b_stage1_step", "c_stage2_step", "d_decoding", "e_end_to_end", "f_serving"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """(completed process, parsed gpu_check.json) of one smoke run on the CPU."""
    pytest.importorskip("transformers")  # the reference in sections (a) and (d)
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    path = out / "gpu_check.json"
    return proc, json.loads(path.read_text()) if path.exists() else None


def test_smoke_run_passes_every_section(smoke_run):
    proc, report = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report is not None, "gpu_check.json was not written"
    assert report["environment"]["smoke"] is True
    assert list(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["passed"] and section["error"] is None, (name, section.get("error"), section.get("traceback"))
    assert report["passed"] is True
    assert "all sections passed" in proc.stdout


def test_smoke_run_records_the_measurements(smoke_run):
    _, report = smoke_run
    s = report["sections"]
    assert s["a_parity"]["fp32"]["max_abs_dlogit"] < 1e-4
    assert s["a_parity"]["bf16"]["ours_vs_fp32"] <= 1.5 * s["a_parity"]["bf16"]["transformers_vs_fp32"]
    for key in ("checkpointing", "no_checkpointing"):
        step = s["b_stage1_step"][key]
        assert step["fits"] and step["finite"] and step["tokens_per_s"] > 0 and step["mfu_of_measured_gemm"] > 0
    assert "flops_formula" in s["b_stage1_step"]
    assert s["c_stage2_step"]["full_head"]["seconds_per_step"] > 0
    for impl in ("ours_eager", "transformers"):
        for batch in ("batch_1", "batch_8"):
            assert s["d_decoding"][impl][batch]["end_to_end_tok_s"] > 0
            assert s["d_decoding"][impl][batch]["bound_tok_s"] > 0
    assert "ours_compiled" in s["d_decoding"]
    for cli in ("train_sft", "train_head", "generate"):
        assert s["e_end_to_end"][cli]["passed"]
    f = s["f_serving"]
    assert f["rows_equal_to_solo"] == f["requests"] == 16 and f["one_at_a_time_tok_s"] > 0 and f["ratio"] > 0


def test_help_shows_defaults():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--out" in proc.stdout and "(default: cuda)" in proc.stdout
