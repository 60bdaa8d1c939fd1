"""Make any 3D CNN mask-aware in place: ``mae3d.sparsify(model)`` + ``active_mask``.

``sparsify`` swaps the class of every Conv3d, ConvTranspose3d, InstanceNorm3d, BatchNorm3d,
MaxPool3d, AvgPool3d and Upsample of a model (torchvision / MONAI / nnU-Net) for a mask-aware
subclass: parameters, buffers, hooks and state_dict keys stay exactly the same. The converted
modules of one model share one ``MaskState``; ``with active_mask(model, block_mask, block_size):
model(x)`` fills it for the forward (and the backward that follows). Outside the block, or for a
model never given a mask, every module runs its dense torch forward.

Every mask-aware layer reads the mask at the spatial size of its input and of its output with
``mae3d.masking.block_mask_at`` (the project's one mask pyramid), axis by axis: the mask keeps its
grid and a cell covers size / grid voxels, so a (1, 2, 2) stride, a transposed conv or an
upsampling past the input size each get the cells they really have. Each layer also checks that
its output is aligned with its input (a stride-s conv, pool or downsampling: out = ceil(in / s)
per axis; a transposed conv: out = in * s; an upsampling: an integer ratio), and a layer of
another type that changes the spatial size (a crop, a pad, an adaptive pool) raises while a mask
is active. Where the mask cannot follow, a ValueError names the layer: never an approximation.

Semantics = SparK/S3D's emulation (reference notes, sections 2 and 3) without its defects:
convs compute active output blocks only (``mae3d::sparse_conv3d``), norms use visible voxels
only (``mae3d::masked_norm``), pools, transposed convs and upsamplings re-mask their output
(max-pool takes the max over visible voxels). The input must already be zero on masked voxels
(``mask_input``). A conv the op cannot run (its kernel, stride or dilation, or cells that differ
per axis and do not refine to cubic cells of a size the stride divides) runs as a dense conv
whose output is masked: exact, not faster.

The state lives on the model, not in a global: two models never see each other's masks. It is
plain Python state read in forward, so torch.compile traces it (the mask is a graph input).
Like BatchNorm's running statistics, it is not meant for one model object used by several
threads at once with different masks.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from mae3d.masking import block_mask_at, upsample_block_mask
from mae3d.nn.norm import MaskedBatchNorm3d, MaskedInstanceNorm3d
from mae3d.nn.sparse_conv import SparseConv3d, sparse_conv_args
from mae3d.ops._torch_backends.sparse_conv_plan import share as share_plans

__all__ = ["MaskState", "active_mask", "mask_input", "sparsify"]

_STATE_ATTR = "_mae3d_mask_state"
_NAME_ATTR = "_mae3d_name"


class MaskState:
    """The mask of the current forward, shared by the converted modules of one model.

    ``block_mask`` (B, gD, gH, gW) bool or None (no mask: every layer dense), ``block_size``
    (voxels per cell edge at the model input, per axis), ``coarse`` ("dense" or "any"),
    ``max_active`` (the most True cells of ``block_mask`` in one sample, or None: lets the sparse
    convs run without a host sync, see ``mae3d.ops.sparse_conv.sparse_conv3d``). A model
    property set by ``sparsify``: ``active_grad_x`` (the sparse convs skip the input gradient
    of inactive voxels)."""

    def __init__(self) -> None:
        self.block_mask: Tensor | None = None
        self.block_size: tuple[int, int, int] = (1, 1, 1)
        self.coarse: str = "dense"
        self.max_active: int | None = None
        self.active_grad_x: bool = False

    def at(
        self, spatial: Sequence[int], name: str = "", batch: int | None = None
    ) -> tuple[Tensor, tuple[int, int, int]] | None:
        """(block_mask, block size per axis) at a feature map of spatial size ``spatial``;
        None = dense. ``name`` (the layer asking) prefixes errors; ``batch``, the map's batch
        size, must be the mask's."""
        m = self.block_mask
        if m is None:
            return None
        who = name or "sparsify"
        if batch is not None and batch != m.shape[0]:
            raise ValueError(
                f"{who}: its input has batch size {batch} but the active block "
                f"mask has {m.shape[0]} samples"
            )
        return block_mask_at(m, spatial, self.coarse, name=who)

    def voxels(
        self, spatial: Sequence[int], name: str = "", batch: int | None = None
    ) -> Tensor | None:
        """(B, 1, *spatial) bool voxel mask at that resolution; None = dense."""
        return _voxels(self.at(spatial, name, batch), spatial)


def _voxels(st, spatial) -> Tensor | None:
    if st is None:
        return None
    m, bs = st
    return upsample_block_mask(m, bs, tuple(spatial))


def _state(module: nn.Module) -> MaskState:
    return getattr(module, _STATE_ATTR)


def _label(module: nn.Module) -> str:
    return getattr(module, _NAME_ATTR, f"sparsify: {type(module).__name__}")


def _ints(v) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _check_aligned(mod: nn.Module, n_in, n_out, stride, up: bool) -> None:
    """The output grid of a strided (or transposed, ``up``) layer lines up with its input's:
    out = ceil(in / s) (out = in * s) on every axis; otherwise the mask cannot follow it."""
    n_in, n_out = tuple(n_in), tuple(n_out)
    want = tuple(n * s if up else -(-n // s) for n, s in zip(n_in, stride))
    if n_out != want:
        rule = "in * stride" if up else "ceil(in / stride)"
        raise ValueError(
            f"{_label(mod)} maps spatial size {n_in} to {n_out}, but the mask follows a layer "
            f"of stride {tuple(stride)} only when its output is aligned with its input "
            f"(out = {rule} = {want}, e.g. padding kernel // 2)"
        )


def _conv_out(conv: nn.Conv3d, spatial) -> tuple[int, int, int]:
    pad = conv.padding
    if pad == "same":
        return tuple(spatial)  # type: ignore[return-value]
    pad = (0, 0, 0) if pad == "valid" else pad
    return tuple(  # type: ignore[return-value]
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(spatial, conv.kernel_size, conv.stride, pad, conv.dilation)
    )


def _remask(y: Tensor, st) -> Tensor:
    vox = _voxels(st, y.shape[2:])
    return y if vox is None else torch.where(vox, y, 0.0)


class _MaskedConv3d(SparseConv3d):
    """SparseConv3d reading the model's mask state when no mask is passed."""

    _dense_fallback = False

    def forward(
        self,
        x: Tensor,
        block_mask: Tensor | None = None,
        block_size: int | None = None,
        *,
        max_active: int | None = None,
        active_grad_x: bool = False,
    ) -> Tensor:
        state = _state(self)
        if block_mask is not None or state.block_mask is None:
            return super().forward(
                x, block_mask, block_size, max_active=max_active, active_grad_x=active_grad_x
            )
        name = _label(self)
        n_in = tuple(x.shape[2:])
        n_out = _conv_out(self, n_in)
        _check_aligned(self, n_in, n_out, self.stride, up=False)
        B = x.shape[0]
        src, dst = state.at(n_in, name, B), state.at(n_out, name, B)
        if dst is None:
            return nn.Conv3d.forward(self, x)
        if src is not None and not self._dense_fallback:
            m, blk = src
            bound = state.max_active
            if bound is not None and m.shape[1:] != state.block_mask.shape[1:]:
                bound = min(bound, math.prod(m.shape[1:]))  # pooled cells ("any"): no more
            # Cells that differ per axis refine to cubic cells of their gcd: the same voxel mask,
            # which the op (one block size) runs exactly when the stride divides the cell.
            c = blk[0] if blk[0] == blk[1] == blk[2] else math.gcd(*blk)
            if c % self.stride[0] == 0:
                for axis, b in enumerate(blk):
                    if b != c:
                        m = m.repeat_interleave(b // c, dim=axis + 1)
                        bound = None if bound is None else bound * (b // c)
                return super().forward(x, m, c, max_active=bound, active_grad_x=state.active_grad_x)
        return _remask(nn.Conv3d.forward(self, x), dst)


class _MaskedConvTranspose3d(nn.ConvTranspose3d):
    """ConvTranspose3d, output re-masked at its resolution (dense compute, exact)."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        y = super().forward(x, output_size)
        state = _state(self)
        if state.block_mask is None:
            return y
        _check_aligned(self, x.shape[2:], y.shape[2:], self.stride, up=True)
        return _remask(y, state.at(y.shape[2:], _label(self), y.shape[0]))


class _MaskedInstanceNorm3d(MaskedInstanceNorm3d):
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            mask = _state(self).voxels(x.shape[2:], _label(self), x.shape[0])
        return super().forward(x, mask)


class _MaskedBatchNorm3d(MaskedBatchNorm3d):
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            mask = _state(self).voxels(x.shape[2:], _label(self), x.shape[0])
        return super().forward(x, mask)


class MaskedMaxPool3d(nn.MaxPool3d):
    """MaxPool3d over visible voxels only; output re-masked at its resolution."""

    def forward(self, x: Tensor) -> Tensor:
        state, name = _state(self), _label(self)
        vin = state.voxels(x.shape[2:], name, x.shape[0])
        if vin is None and state.block_mask is None:
            return super().forward(x)
        y = super().forward(x if vin is None else torch.where(vin, x, float("-inf")))
        _check_aligned(self, x.shape[2:], y.shape[2:], _ints(self.stride), up=False)
        vout = state.voxels(y.shape[2:], name, y.shape[0])
        if vin is None:
            return y if vout is None else torch.where(vout, y, 0.0)
        keep = torch.isfinite(y) if vout is None else (vout & torch.isfinite(y))
        return torch.where(keep, y, 0.0)


class MaskedAvgPool3d(nn.AvgPool3d):
    """AvgPool3d on the zero-filled input, output re-masked (SparK / S3D). With aligned block
    masks and windows inside one block (kernel = stride <= block size) it averages visible
    voxels only."""

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        state = _state(self)
        if state.block_mask is None:
            return y
        if (
            x.dim() == 5
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last_3d)
        ):  # the CPU pool returns NCDHW: keep a channels-last model channels-last
            y = y.contiguous(memory_format=torch.channels_last_3d)
        _check_aligned(self, x.shape[2:], y.shape[2:], _ints(self.stride), up=False)
        return _remask(y, state.at(y.shape[2:], _label(self), y.shape[0]))


class MaskedUpsample(nn.Upsample):
    """Upsample (any mode) with its output re-masked; the mask follows integer ratios only."""

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        state = _state(self)
        if state.block_mask is None or x.dim() != 5:
            return y
        n_in, n_out = tuple(x.shape[2:]), tuple(y.shape[2:])
        if any(b % a and a % b for a, b in zip(n_in, n_out)):
            raise ValueError(
                f"{_label(self)} maps spatial size {n_in} to {n_out}: the mask follows an "
                "upsampling only by an integer factor on every axis"
            )
        return _remask(y, state.at(n_out, _label(self), y.shape[0]))


_SWAPS: dict[type, type] = {
    nn.Conv3d: _MaskedConv3d,
    SparseConv3d: _MaskedConv3d,
    nn.ConvTranspose3d: _MaskedConvTranspose3d,
    nn.InstanceNorm3d: _MaskedInstanceNorm3d,
    MaskedInstanceNorm3d: _MaskedInstanceNorm3d,
    nn.BatchNorm3d: _MaskedBatchNorm3d,
    MaskedBatchNorm3d: _MaskedBatchNorm3d,
    nn.MaxPool3d: MaskedMaxPool3d,
    nn.AvgPool3d: MaskedAvgPool3d,
    nn.Upsample: MaskedUpsample,
}
_CONVERTED = frozenset(_SWAPS.values())
_NOT_MASK_AWARE = (
    nn.GroupNorm,
    nn.LayerNorm,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool3d,
    nn.Conv3d,
    nn.ConvTranspose3d,
    nn.InstanceNorm3d,
    nn.BatchNorm3d,
    nn.MaxPool3d,
    nn.AvgPool3d,
    nn.Upsample,
)
# Leaf modules of these torch files never change the spatial size of a (B, C, D, H, W) tensor
# (nn.Linear only acts on the last axis, e.g. of a channels-last tensor): no size check.
_SIZE_KEEPING = frozenset(
    f"torch.nn.modules.{m}"
    for m in ("activation", "dropout", "normalization", "batchnorm", "instancenorm", "linear")
)


def _size_check_hook(mod: nn.Module, args, out) -> None:
    """Forward hook of the leaves sparsify does not know: while a mask is active, changing the
    spatial size is an error (the mask could not follow those voxels)."""
    state = getattr(mod, _STATE_ATTR, None)
    if state is None or state.block_mask is None or not args:
        return
    x = args[0]
    if (
        isinstance(x, Tensor)
        and isinstance(out, Tensor)
        and x.dim() == 5
        and out.dim() == 5
        and x.shape[2:] != out.shape[2:]
    ):
        raise ValueError(
            f"{_label(mod)} changes the spatial size {tuple(x.shape[2:])} -> "
            f"{tuple(out.shape[2:])}; the mask follows Conv3d, ConvTranspose3d, MaxPool3d, "
            "AvgPool3d and Upsample layers only: sparsify the part of the model before this "
            "layer, or run it outside active_mask"
        )


def sparsify(model: nn.Module, *, strict: bool = False, active_grad_x: bool = False) -> nn.Module:
    """Convert, in place, the 3D convs, transposed convs, norms, pools and upsamplings of
    ``model`` into mask-aware versions that share one ``MaskState``; returns the model.
    state_dict keys and values are unchanged.

    ``active_grad_x=True``: the sparse convs compute their input gradient on active voxels only
    (the halo gradient on inactive voxels is skipped). Parameter gradients stay exact only when
    every consumer of each sparse conv's input gradient drops inactive voxels: each conv input is
    a masked norm's output, a re-masked pool or transposed conv, or the masked input (plus
    residual sums of those), as in nnU-Net ResEnc encoders; S3D turns it on. Off by default: an
    arbitrary model may feed a conv from a layer that is not mask-aware. Converting again sets it
    anew.

    Only modules of exactly these torch (or mae3d) classes are converted: a subclass may have its
    own forward, which a class swap would drop. A Conv3d the sparse op cannot run (kernel not
    cubic 1/2/3, stride not 1 or 2 on every axis, dilation, groups, padding mode) and every
    ConvTranspose3d become dense layers whose output is re-masked (exact, not faster). Layers
    left dense or converted that way get a warning naming them; ``strict=True`` raises instead.
    Leaf modules of other types get a forward hook that raises, naming them, if they change the
    spatial size while a mask is active. Converting twice is a no-op.
    """
    if not isinstance(active_grad_x, bool):
        raise TypeError(f"sparsify: active_grad_x must be a bool, got {active_grad_x!r}")
    state = getattr(model, _STATE_ATTR, None) or MaskState()
    state.active_grad_x = active_grad_x
    object.__setattr__(model, _STATE_ATTR, state)
    for name, mod in model.named_modules():
        label = name or type(model).__name__
        kind = type(mod)
        if not hasattr(mod, _NAME_ATTR):
            object.__setattr__(mod, _NAME_ATTR, f"sparsify: layer {label!r} ({kind.__name__})")
        new = _SWAPS.get(kind)
        if new is MaskedMaxPool3d and mod.return_indices:
            new = None
        if new is _MaskedConv3d:
            try:
                sparse_conv_args(mod)
            except ValueError as e:
                _complain(strict, f"sparsify: {label} runs as dense conv + re-mask: {e}")
                mod._dense_fallback = True
        elif new is _MaskedConvTranspose3d:
            _complain(strict, f"sparsify: {label} runs as dense transposed conv + re-mask")
        if new is not None:
            mod.__class__ = new
        elif kind not in _CONVERTED:
            if isinstance(mod, _NOT_MASK_AWARE):
                _complain(
                    strict, f"sparsify: {label} ({kind.__name__}) is not mask-aware and runs dense"
                )
            if (
                next(mod.children(), None) is None
                and kind.__module__ not in _SIZE_KEEPING
                and _size_check_hook not in mod._forward_hooks.values()
            ):
                mod.register_forward_hook(_size_check_hook)
        object.__setattr__(mod, _STATE_ATTR, state)
    return model


def _complain(strict: bool, msg: str) -> None:
    if strict:
        raise ValueError(msg)
    warnings.warn(msg, stacklevel=3)


@contextlib.contextmanager
def active_mask(
    model: nn.Module,
    block_mask: Tensor,
    block_size: int | Sequence[int],
    coarse: str = "dense",
    *,
    max_active: int | None = None,
) -> Iterator[MaskState]:
    """Run ``model`` (converted by ``sparsify``) with ``block_mask`` (B, gD, gH, gW), True =
    visible, of ``block_size`` voxels per cell edge (an int, or one per axis) at the model's
    input. Every layer reads the mask at its own resolution (``mae3d.masking.block_mask_at``);
    ``coarse``: "dense" or "any", for feature maps coarser than the mask grid. ``max_active``:
    the most True cells of ``block_mask`` in any one sample when known (an MAE mask's visible
    count, ``mae3d.masking.visible_count``): the sparse convs then need no host sync on CUDA; a
    sample with more raises in the sparse conv. Nests; restores the previous mask."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("active_mask: the model was not converted by mae3d.sparsify")
    if coarse not in ("dense", "any"):
        raise ValueError(f"active_mask: coarse must be 'dense' or 'any', got {coarse!r}")
    if (
        not isinstance(block_mask, Tensor)
        or block_mask.dim() != 4
        or block_mask.dtype not in (torch.bool, torch.uint8)
    ):
        raise ValueError("active_mask: block_mask must be a bool (B, gD, gH, gW) tensor")
    bs = block_size if isinstance(block_size, Sequence) else (block_size,) * 3
    if len(bs) != 3 or not all(
        isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bs
    ):
        raise ValueError(
            f"active_mask: block_size must be a positive int or three positive "
            f"ints, got {block_size!r}"
        )
    bs = tuple(bs)
    if max_active is not None and (
        not isinstance(max_active, int) or isinstance(max_active, bool) or max_active < 0
    ):
        raise ValueError(f"active_mask: max_active must be None or an int >= 0, got {max_active!r}")
    prev = (state.block_mask, state.block_size, state.coarse, state.max_active)
    # A private copy: the packed sparse convs may then reuse their block lists and indices
    # across the layers and passes that see it (a caller's tensor could change unseen).
    own = block_mask.to(torch.bool, copy=True)
    share_plans(own)
    state.block_mask, state.block_size, state.coarse = own, bs, coarse
    state.max_active = max_active
    try:
        yield state
    finally:
        state.block_mask, state.block_size, state.coarse, state.max_active = prev


def mask_input(x: Tensor, block_mask: Tensor, block_size: int | Sequence[int]) -> Tensor:
    """x (B, C, D, H, W) with masked voxels set to 0 (what the first sparse layer expects)."""
    return torch.where(upsample_block_mask(block_mask, block_size, x.shape[2:]), x, 0.0)
