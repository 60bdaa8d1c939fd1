"""mae3d's benchmarks, one module per op and per model, run from the repository root:

    python -m bench.masked_norm       mae3d::masked_norm vs nnssl / SparK gathers, eager, compiled
    python -m bench.window_attention  mae3d::window_attention3d vs eager, SDPA, compiled, Flex
    python -m bench.sparse_conv       mae3d::sparse_conv3d vs dense conv x mask, spconv
    python -m bench.s3d               one S3D pre-training step vs the nnssl emulation
    python -m bench.bertswin          one BertsWin step, fused vs eager ops, vs ViT-MAE
    python -m bench.swinunetr         MONAI SwinUNETR's encoder with the fused attention swapped in
    python -m bench.convergence       BertsWin vs ViT-MAE held-out masked MSE over training steps
    python -m bench.gpu_smoke         every op's Triton kernels vs float64, small shapes
    python -m bench.gpu_design        profiler split, CUDA-graph replay, autotune sweeps
    python -m bench.static_report     sm_90 compile report without a GPU
    python -m bench.compare A B       rows of two result CSVs matched, regressions flagged

Each takes ``--help``. Shared pieces: ``bench.harness`` (timing, peak memory, CSV rows, the
table, the common flags), ``bench.baselines`` (every baseline implementation), ``bench.sm90``
(the fake sm_90 target of the static report and tests/triton_compile.py). Results are rows of
``bench/results/<device>.csv``. Needs the dev extra (tabulate).
"""
