"""mae3d.kernels.tuning: per-GPU launch configurations read from kernels/configs/<gpu>.json."""

from __future__ import annotations

import json

import pytest
import torch
from mae3d.kernels import tuning


@pytest.fixture()
def configs(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    tuning.load.cache_clear()
    yield tmp_path
    tuning.load.cache_clear()


def test_slug_matches_the_benchmark_device_label():
    assert tuning.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tuning.gpu_slug("NVIDIA H200") == "nvidia-h200"


def test_lookup_by_gpu_kernel_and_key(configs):
    entry = {"BLOCK_S": 1024, "num_warps": 8}
    (configs / "nvidia-h200.json").write_text(
        json.dumps(
            {"gpu": "NVIDIA H200", "kernels": {"_masked_norm_fwd_kernel": {"2x32/bf16": entry}}}
        )
    )
    assert tuning.tuned_config("_masked_norm_fwd_kernel", "2x32/bf16", "NVIDIA H200") == entry
    assert tuning.tuned_config("_masked_norm_fwd_kernel", "other", "NVIDIA H200") is None
    assert tuning.tuned_config("_other_kernel", "2x32/bf16", "NVIDIA H200") is None
    assert tuning.tuned_config("_masked_norm_fwd_kernel", "2x32/bf16", "NVIDIA A100") is None
    # a CPU tensor's device never has tuned configs; the answer is a copy
    assert tuning.tuned_config("_masked_norm_fwd_kernel", "2x32/bf16", torch.device("cpu")) is None
    got = tuning.tuned_config("_masked_norm_fwd_kernel", "2x32/bf16", "NVIDIA H200")
    got["num_warps"] = 1
    assert tuning.tuned_config("_masked_norm_fwd_kernel", "2x32/bf16", "NVIDIA H200") == entry


def test_malformed_file_raises_naming_it(configs):
    (configs / "nvidia-h200.json").write_text(json.dumps({"gpu": "NVIDIA H200"}))
    with pytest.raises(ValueError, match="nvidia-h200.json"):
        tuning.tuned_config("k", "key", "NVIDIA H200")


def test_importing_tuning_imports_no_triton():
    import subprocess
    import sys

    code = "import sys, mae3d.kernels.tuning; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
