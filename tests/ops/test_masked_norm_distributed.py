"""Batch-mode masked norm across 2 CPU processes (gloo) equals one process on the whole batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mae3d.nn import MaskedBatchNorm3d

pytestmark = pytest.mark.distributed


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, 7, generator=g, dtype=torch.float64) * 3 + 1
    ratio = torch.tensor([0.2, 0.7, 0.5, 0.9]).view(4, 1, 1, 1, 1)  # visible counts differ
    m = torch.rand(4, 1, 5, 6, 7, generator=g) > ratio
    gy = torch.randn(4, 3, 5, 6, 7, generator=g, dtype=torch.float64)
    return x, m, gy


def _step(norm, x, m, gy):
    x = x.clone().requires_grad_(True)
    y = norm(x, m)
    y.backward(gy)
    return y.detach(), x.grad


def _worker(rank: int, world: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, m, gy = _inputs()
    sl = slice(2 * rank, 2 * rank + 2)  # rank 0: samples 0-1, rank 1: samples 2-3
    norm = MaskedBatchNorm3d(3, momentum=0.2).double()
    norm.negative_slope = 0.01
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    y, gx = _step(norm, x[sl], m[sl], gy[sl])
    gw, gb = norm.weight.grad.clone(), norm.bias.grad.clone()
    dist.all_reduce(gw)
    dist.all_reduce(gb)
    torch.save({"y": y, "gx": gx, "gw": gw, "gb": gb, "rm": norm.running_mean,
                "rv": norm.running_var}, os.path.join(results, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    world = 2
    mp.start_processes(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)),
                       nprocs=world, join=True, start_method="spawn")
    x, m, gy = _inputs()
    norm = MaskedBatchNorm3d(3, momentum=0.2).double()
    norm.negative_slope = 0.01
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    y, gx = _step(norm, x, m, gy)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(world)]
    torch.testing.assert_close(torch.cat([r[0]["y"], r[1]["y"]]), y)
    torch.testing.assert_close(torch.cat([r[0]["gx"], r[1]["gx"]]), gx)
    for i in range(world):
        torch.testing.assert_close(r[i]["gw"], norm.weight.grad)
        torch.testing.assert_close(r[i]["gb"], norm.bias.grad)
        torch.testing.assert_close(r[i]["rm"], norm.running_mean)
        torch.testing.assert_close(r[i]["rv"], norm.running_var)
    # the per-rank result differs from the synced one: the test can fail
    local = MaskedBatchNorm3d(3).double()
    y0, _ = _step(local, x[:2], m[:2], gy[:2])
    assert not torch.allclose(y0, y[:2])


def _worker_backend(rank: int, world: int, init_file: str, results: str, backend: str) -> None:
    """Rank 0 holds sample 0, rank 1 samples 1-3: per-rank batch sizes differ."""
    import os as _os

    if backend == "triton":
        _os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from mae3d.ops import use_backend

    x, m, gy = _inputs()
    sl = slice(0, 1) if rank == 0 else slice(1, 4)
    norm = MaskedBatchNorm3d(3, momentum=0.2).double()
    norm.negative_slope = 0.01
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    with use_backend(backend):
        y, gx = _step(norm, x[sl], m[sl], gy[sl])
    torch.save({"y": y, "gx": gx, "gw": norm.weight.grad.clone(), "gb": norm.bias.grad.clone(),
                "rm": norm.running_mean, "rv": norm.running_var},
               os.path.join(results, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", [
    pytest.param("reference", id="reference"),
    pytest.param("cpp", marks=pytest.mark.ext, id="cpp"),
    pytest.param("triton", marks=pytest.mark.triton, id="triton"),
])
def test_two_ranks_of_different_batch_sizes(tmp_path, backend):
    """Each backend's synced path (one all-gather of partials per pass) with 1 and 3 samples per
    rank equals one process on the whole batch; weight/bias gradients stay per rank."""
    world = 2
    mp.start_processes(_worker_backend,
                       args=(world, str(tmp_path / "init"), str(tmp_path), backend),
                       nprocs=world, join=True, start_method="spawn")
    x, m, gy = _inputs()
    norm = MaskedBatchNorm3d(3, momentum=0.2).double()
    norm.negative_slope = 0.01
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    y, gx = _step(norm, x, m, gy)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(world)]
    torch.testing.assert_close(torch.cat([r[0]["y"], r[1]["y"]]), y)
    torch.testing.assert_close(torch.cat([r[0]["gx"], r[1]["gx"]]), gx)
    torch.testing.assert_close(r[0]["gw"] + r[1]["gw"], norm.weight.grad)
    torch.testing.assert_close(r[0]["gb"] + r[1]["gb"], norm.bias.grad)
    for i in range(world):
        torch.testing.assert_close(r[i]["rm"], norm.running_mean)
        torch.testing.assert_close(r[i]["rv"], norm.running_var)
