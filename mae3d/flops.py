"""FLOP and parameter accounting of mae3d's MAE models; the BertsWin / ViT-MAE / S3D parity table.

What is counted ("parity" is measured here): **forward FLOPs per sample of one pre-training
forward (encoder + decoder + loss) at a given mask ratio**, counted by
``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-accumulate of matrix products
(mm/addmm/bmm/baddbmm), convolutions (incl. transposed), scaled-dot-product attention (QK^T and
AV) and the mae3d ops, which register formulas that count the work they really do (a sparse conv
counts its active output voxels, window attention its windows). Element-wise work (norms,
activations, softmax, positional adds, the loss) is NOT counted. The mask is drawn with
``mae3d.masking.random_block_mask`` (the model's ``mask_count`` rule, default "mae"), so the
numbers of sparse models depend on the ratio; dense ones do not. Backward FLOPs are counted only
with ``backward=True`` (reported separately).

Encoder / decoder split, by module hierarchy (the convention for every mae3d model):

1. a model may define ``encoder_modules()`` and/or ``decoder_modules()`` returning submodules
   (nn.Module objects of the model; an nn.ModuleList / ModuleDict stands for its members);
   otherwise
2. its top-level children whose attribute names start with ``encoder`` / ``decoder`` form the
   groups.

FLOPs are attributed by forward hooks on these modules (a call nested in another group call
counts for the outer one), so only modules that are *called* count; parameters reachable from
both groups count in the encoder.

FLOPs spent outside both groups (ops in the top-level forward, e.g. a loss matmul) and parameters
owned by neither (e.g. a top-level mask token) are reported as ``other``; totals include them.

Counting at the published sizes does not run the networks: build the model under
``torch.device("meta")`` and ``report`` feeds meta inputs (shapes only). The mask is passed on the
CPU, so a model must compute its mask-dependent indices/counts from the mask before moving it to
``x.device`` (ViTMAE3d does).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mae3d.masking import random_block_mask

__all__ = ["FlopReport", "format_table", "parity_table", "report"]


@dataclass
class FlopReport:
    """Per-sample forward GFLOPs (1e9) and parameter counts of one model at one input and ratio."""

    name: str
    input_shape: tuple[int, ...]
    mask_ratio: float
    encoder_gflops: float
    decoder_gflops: float
    other_gflops: float
    total_gflops: float
    encoder_params: int
    decoder_params: int
    total_params: int
    backward_gflops: float | None = None
    by_op: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def _formulas(cpu_mask: torch.Tensor, count_norms: bool, notes: list[str]) -> dict:
    """Formulas added to ``FlopCounterMode``'s registry for one count:

    - the fused CPU SDPA kernels, missing from torch's registry (torch 2.13);
    - ``mae3d::masked_norm`` counted as 0 unless ``count_norms`` (aten norms are not counted);
    - ``mae3d::sparse_conv3d`` on a meta block mask (values unknown, the op's own formula falls
      back to the dense count): the mask values are taken from ``cpu_mask`` when the grid is the
      input mask's grid (models pass the input mask to every stage on that grid, with a smaller
      block size), and all-visible on any other grid (S3D's coarse stages run dense).
    """
    from torch.utils import flop_counter as fc

    import mae3d.ops.sparse_conv as sc

    aten = torch.ops.aten
    mapping: dict = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:
        mapping[fwd] = lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v)
    if bwd is not None:
        mapping[bwd] = lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(
            g, q, k, v)

    def raw(f):
        f._get_raw = True
        return f

    if not count_norms:
        for name in ("masked_norm", "masked_norm_backward"):
            mapping[getattr(torch.ops.mae3d, name)] = raw(lambda *a, **kw: 0)

    def values(block_mask: torch.Tensor) -> torch.Tensor:
        if block_mask.device.type != "meta":
            return block_mask
        if tuple(block_mask.shape) == tuple(cpu_mask.shape):
            return cpu_mask
        note = f"sparse_conv3d on a {tuple(block_mask.shape[1:])} grid counted dense"
        if note not in notes:
            notes.append(note)
        return torch.ones(block_mask.shape, dtype=torch.bool)

    def conv_fwd(x, weight, bias, block_mask, block_size, stride, padding, *a, out_val=None,
                 **kw):
        n = sc.active_output_voxels(values(block_mask), block_size, stride,
                                    tuple(out_val.shape[2:]))
        return sc.sparse_conv3d_flops(tuple(weight.shape), n)

    def conv_bwd(grad_out, x, weight, block_mask, block_size, stride, padding, has_bias,
                 needs_grad_x, *a, out_val=None, **kw):
        n = sc.active_output_voxels(values(block_mask), block_size, stride,
                                    tuple(grad_out.shape[2:]))
        return sc.sparse_conv3d_flops(tuple(weight.shape), n, backward=needs_grad_x)

    mapping[torch.ops.mae3d.sparse_conv3d] = raw(conv_fwd)
    mapping[torch.ops.mae3d.sparse_conv3d_backward] = raw(conv_bwd)
    return mapping


def _groups(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Encoder and decoder submodules (see the module docstring)."""
    owned = {id(m) for _, m in model.named_modules(remove_duplicate=False) if m is not model}
    groups: dict[str, list[nn.Module]] = {}
    for group in ("encoder", "decoder"):
        fn = getattr(model, f"{group}_modules", None)
        if callable(fn):
            mods = list(fn())
            bad = [type(m).__name__ for m in mods
                   if not isinstance(m, nn.Module) or id(m) not in owned]
            if bad:
                raise ValueError(f"{group}_modules() must return submodules of the model, got "
                                 f"{bad}")
            groups[group] = mods
        else:
            groups[group] = [m for n, m in model.named_children() if n.startswith(group)]
    for group, mods in groups.items():  # containers are never called: hook their members
        flat: list[nn.Module] = []
        while mods:
            m = mods.pop(0)
            if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
                mods[:0] = list(m.children())
            else:
                flat.append(m)
        groups[group] = flat
    if {id(m) for m in groups["encoder"]} & {id(m) for m in groups["decoder"]}:
        raise ValueError("a module is in both the encoder and the decoder group")
    return groups


def _group_params(groups: dict[str, list[nn.Module]]) -> dict[str, int]:
    """Parameters per group; one reachable from both (a decoder holding a reference to the
    encoder, as nnU-Net's does) counts in the encoder."""
    enc = {id(p): p for m in groups["encoder"] for p in m.parameters()}
    dec = {id(p): p for m in groups["decoder"] for p in m.parameters() if id(p) not in enc}
    return {"encoder": sum(p.numel() for p in enc.values()),
            "decoder": sum(p.numel() for p in dec.values())}


def _mask_cell(model: nn.Module) -> tuple[int, int, int]:
    cell = getattr(model, "mask_cell", None)
    if isinstance(cell, int) and not isinstance(cell, bool) and cell > 0:
        return (cell, cell, cell)
    if isinstance(cell, (tuple, list)) and len(cell) == 3 and all(int(c) > 0 for c in cell):
        return tuple(int(c) for c in cell)  # type: ignore[return-value]
    raise ValueError(f"model must have an int attribute mask_cell (voxels per mask-cell edge), "
                     f"got {cell!r}")


def report(
    model: nn.Module,
    input_shape: Sequence[int],
    mask_ratio: float = 0.75,
    *,
    name: str | None = None,
    seed: int = 0,
    backward: bool = False,
    mask_device: str = "cpu",
    count_norms: bool = False,
) -> FlopReport:
    """Counts one forward of ``model(x, mask)`` on the device of the model's parameters.

    Args:
        model: an mae3d MAE (``forward(x, mask=None) -> MAEOutput``, attribute ``mask_cell``);
            built under ``torch.device("meta")`` to count without computing.
        input_shape: (C, D, H, W) for one sample, or (B, C, D, H, W); results are per sample.
        mask_ratio: fraction of masked cells of the (D, H, W) / mask_cell grid.
        seed: seed of the mask generator.
        backward: also run ``loss.backward()`` and report its GFLOPs per sample.
        mask_device: "cpu" (default: the mask is passed on the CPU, what a meta-device count
            needs from a model that reads mask values) or "model" (on the parameters' device,
            for models that require the mask beside x; sparse convs are then resolved as in
            ``_formulas``).
        count_norms: also count mae3d::masked_norm's formula (aten norms are never counted).
    Returns:
        ``FlopReport`` (GFLOPs = 1e9 FLOPs, 2 per multiply-accumulate, per sample).
    """
    # mae3d.ops defines torch.ops.mae3d.* and queues their formulas; importing flop_counter
    # (after it, or before: the queue flushes either way) registers them.
    from torch.utils.flop_counter import FlopCounterMode

    import mae3d.ops  # noqa: F401

    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4:
        shape = (1, *shape)
    if len(shape) != 5 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, D, H, W) or (B, C, D, H, W) with positive "
                         f"sizes, got {tuple(input_shape)}")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio!r}")
    if mask_device not in ("cpu", "model"):
        raise ValueError(f"mask_device must be 'cpu' or 'model', got {mask_device!r}")
    cell = _mask_cell(model)
    if any(s % c for s, c in zip(shape[2:], cell)):
        raise ValueError(f"input spatial size {shape[2:]} is not a multiple of mask_cell {cell}")
    grid = tuple(s // c for s, c in zip(shape[2:], cell))
    groups = _groups(model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    B = shape[0]
    gen = torch.Generator().manual_seed(seed)
    mask = random_block_mask(B, grid, mask_ratio, generator=gen,
                             count=getattr(model, "mask_count", "mae"))
    if device.type == "meta":
        x = torch.empty(shape, dtype=dtype, device=device)
    else:
        x = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    model_mask = mask if mask_device == "cpu" else mask.to(device)

    notes: list[str] = []
    formulas = _formulas(mask, count_norms, notes)
    counter = FlopCounterMode(display=False, custom_mapping=formulas)

    def live() -> int:
        return sum(counter.flop_counts["Global"].values())

    # Attribution by forward hooks on the group modules (outermost group call wins), not by
    # FlopCounterMode's module names, which are wrong for modules reachable by two paths.
    spent = {"encoder": 0, "decoder": 0}
    active: list[tuple[str, int]] = []

    def enter(group):
        def hook(mod, args):
            active.append((group, live()))
        return hook

    def leave(mod, args, out):
        group, start = active.pop()
        if not active:
            spent[group] += live() - start

    handles = []
    for group, mods in groups.items():
        for m in mods:
            handles.append(m.register_forward_pre_hook(enter(group)))
            handles.append(m.register_forward_hook(leave))
    try:
        with torch.enable_grad() if backward else torch.no_grad(), counter:
            out = model(x, model_mask)
    finally:
        for h in handles:
            h.remove()
    fwd = live()
    by_op = {str(op): v / B / 1e9 for op, v in counter.flop_counts["Global"].items()}
    bwd = None
    if backward:
        bcounter = FlopCounterMode(display=False, custom_mapping=formulas)
        with bcounter:
            out.loss.backward()
        bwd = sum(bcounter.flop_counts["Global"].values()) / B / 1e9
    n_params = _group_params(groups)
    return FlopReport(
        name=name or type(model).__name__, input_shape=tuple(shape[1:]),
        mask_ratio=float(mask_ratio), encoder_gflops=spent["encoder"] / B / 1e9,
        decoder_gflops=spent["decoder"] / B / 1e9,
        other_gflops=(fwd - spent["encoder"] - spent["decoder"]) / B / 1e9,
        total_gflops=fwd / B / 1e9, encoder_params=n_params["encoder"],
        decoder_params=n_params["decoder"],
        total_params=sum(p.numel() for p in model.parameters()),
        backward_gflops=bwd, by_op=by_op, notes=notes,
    )


# name -> (module, factory, input (C, D, H, W), mask_device) at the published configuration
PUBLISHED = {
    "BertsWin": ("mae3d.models.bertswin", "bertswin_base", (1, 224, 224, 224), "cpu"),
    "ViT-MAE": ("mae3d.models.vitmae", "vitmae_base", (1, 224, 224, 224), "cpu"),
    "S3D (ResEnc-L)": ("mae3d.models.s3d", "S3D", (1, 160, 160, 160), "model"),
}


def parity_table(mask_ratio: float = 0.75, names: Sequence[str] | None = None,
                 backward: bool = False) -> list[FlopReport]:
    """BertsWin vs ViT-MAE vs S3D at their published inputs (224^3, 224^3, 160^3) and
    ``mask_ratio``, counted on the meta device (no compute). Models are imported lazily; a model
    that cannot be built or counted gets a row with ``error`` set (the reason), not numbers."""
    rows = []
    for key in names or list(PUBLISHED):
        if key not in PUBLISHED:
            raise ValueError(f"unknown model {key!r}; known: {list(PUBLISHED)}")
        module, factory, shape, mask_device = PUBLISHED[key]
        try:
            fn = getattr(importlib.import_module(module), factory)
            with torch.device("meta"):
                model = fn()
            rows.append(report(model, shape, mask_ratio, name=key, backward=backward,
                               mask_device=mask_device))
        except Exception as e:  # the row carries the reason
            rows.append(FlopReport(key, shape, float(mask_ratio), *([math.nan] * 4), 0, 0, 0,
                                   error=f"{type(e).__name__}: {e}".splitlines()[0]))
    return rows


def format_table(rows: Sequence[FlopReport]) -> str:
    """Markdown table of ``FlopReport`` rows (GFLOPs per sample, parameters in millions)."""
    lines = ["| model | input | ratio | encoder GFLOPs | decoder GFLOPs | total GFLOPs | "
             "encoder M params | total M params |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = "x".join(map(str, r.input_shape[1:]))
        if r.error:
            lines.append(f"| {r.name} | {size} | {r.mask_ratio:g} | error: {r.error} ||||||")
            continue
        lines.append(
            f"| {r.name} | {size} | {r.mask_ratio:g} | {r.encoder_gflops:.1f} | "
            f"{r.decoder_gflops:.1f} | {r.total_gflops:.1f} | {r.encoder_params / 1e6:.2f} | "
            f"{r.total_params / 1e6:.2f} |"
        )
    return "\n".join(lines)
