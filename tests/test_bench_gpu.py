"""benchmarks/gpu.py runs its CUDA code path on the CPU at tiny sizes (`--device cpu --tiny`), so the GPU
benchmark is not dead code on machines without a GPU. Figures are not checked: speed lives in benchmarks."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_every_part(gpu_bench, tmp_path):
    out = tmp_path / "gpu.json"
    result = gpu_bench.main(["--device", "cpu", "--tiny", "--no-stream", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["mode"] == "tiny" and result["train_step"]["samples_per_s"] > 0
    step = result["train_step"]
    assert len(step["s_per_step"]) == gpu_bench.SIZES["tiny"]["iters"]
    assert set(step["phases_ms"]) == {"fbank", "specaugment", "student_forward", "teacher", "losses", "backward",
                                      "optimiser"} and all(ms > 0 for ms in step["phases_ms"].values())
    assert step["model_flops_per_sample"] > 0 and step["achieved_tflops"] > 0
    assert step["peak"]["tflops"] is None and step["fraction_of_peak"] is None  # a CPU: peak unknown
    assert result["embed"]["float32_clips_per_s"] > 0 and result["embed"]["bfloat16_autocast_clips_per_s"] > 0
    assert result["knn"]["ratio_over_sklearn_cpu"] > 0  # ids and distances were checked against sklearn
    assert result["stream"] == {"skipped": "--no-stream"} and result["supply_over_demand"] is None


def test_peak_is_looked_up_from_the_device_name(gpu_bench):
    assert gpu_bench.peak_tflops("NVIDIA H200")["tflops"] == 989.0
    assert gpu_bench.peak_tflops("NVIDIA H100 PCIe")["tflops"] == 756.0
    assert gpu_bench.peak_tflops("NVIDIA H100 80GB HBM3")["tflops"] == 989.0
    assert gpu_bench.peak_tflops("CPU x86_64")["tflops"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no CUDA")
def test_without_cuda_it_says_so_and_writes_nothing(gpu_bench, tmp_path, capsys):
    assert gpu_bench.main(["--out", str(tmp_path / "gpu.json")]) is None
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "gpu.json").exists()


def test_stream_supply_on_the_cpu(gpu_bench, small_corpus, tmp_path):
    got = gpu_bench.stream_supply(torch.device("cpu"), clip_s=2.0, clips=8, batch=4, work=tmp_path,
                                  corpus_dir=small_corpus / "corpus")
    assert got["clips"] >= 8 and got["clips"] % 4 == 0 and got["clips_per_s"] > 0
