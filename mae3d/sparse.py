"""Make any 3D CNN mask-aware in place: ``mae3d.sparsify(model)`` + ``active_mask``.

``sparsify`` swaps the class of every Conv3d, InstanceNorm3d, BatchNorm3d, MaxPool3d and AvgPool3d
of a model (torchvision / MONAI / nnU-Net) for a mask-aware subclass: parameters, buffers, hooks
and state_dict keys stay exactly the same. The converted modules of one model share one
``MaskState``; ``with active_mask(model, block_mask, block_size): model(x)`` fills it for the
forward (and the backward that follows). Outside the block, or for a model never given a mask,
every module runs its dense torch forward.

Each module finds its resolution from its input: the cumulative stride f = (grid * block_size) /
input size, and runs with block size block_size / f on the same grid (the mask pyramid of
``mae3d.masking.stage_masks``: coarser than the mask grid -> dense, or "any" pooling).
Semantics = SparK/S3D's emulation (reference notes, sections 2 and 3) without its defects:
convs compute active output blocks only (``mae3d::sparse_conv3d``), norms use visible voxels
only (``mae3d::masked_norm``), pools re-mask their output (max-pool takes the max over visible
voxels). The input must already be zero on masked voxels (``mask_input``).

The state lives on the model, not in a global: two models never see each other's masks. It is
plain Python state read in forward, so torch.compile traces it (the mask is a graph input).
Like BatchNorm's running statistics, it is not meant for one model object used by several
threads at once with different masks.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mae3d.masking import upsample_block_mask
from mae3d.nn.norm import MaskedBatchNorm3d, MaskedInstanceNorm3d
from mae3d.nn.sparse_conv import SparseConv3d, sparse_conv_args
from mae3d.reference.sparse_conv import output_voxel_mask

__all__ = ["MaskState", "active_mask", "mask_input", "sparsify"]

_STATE_ATTR = "_mae3d_mask_state"


class MaskState:
    """The mask of the current forward, shared by the converted modules of one model."""

    def __init__(self) -> None:
        self.block_mask: Tensor | None = None
        self.block_size: int = 1
        self.coarse: str = "dense"

    def at(self, spatial) -> tuple[Tensor, int] | None:
        """(block_mask, block_size) at a tensor of spatial size ``spatial``; None = dense."""
        m = self.block_mask
        if m is None:
            return None
        f = max(1, round(m.shape[1] * self.block_size / spatial[0]))
        if f & (f - 1):
            raise ValueError(f"sparsify: input size {tuple(spatial)} is not the mask's resolution "
                             f"{m.shape[1] * self.block_size} divided by a power of two")
        if self.block_size % f == 0:
            return m, self.block_size // f
        if self.coarse == "dense":
            return None
        g = f // self.block_size
        return F.max_pool3d(m[:, None].float(), g, g, ceil_mode=True)[:, 0] > 0, 1

    def voxels(self, spatial) -> Tensor | None:
        """(B, 1, *spatial) bool voxel mask at that resolution; None = dense."""
        st = self.at(spatial)
        if st is None:
            return None
        m, bs = st
        return output_voxel_mask(m, bs, 1, tuple(spatial))


def _state(module: nn.Module) -> MaskState:
    return getattr(module, _STATE_ATTR)


class _MaskedConv3d(SparseConv3d):
    """SparseConv3d reading the model's mask state when no mask is passed."""

    _dense_fallback = False

    def forward(self, x: Tensor, block_mask: Tensor | None = None,
                block_size: int | None = None) -> Tensor:
        if block_mask is None:
            st = _state(self).at(x.shape[2:])
            if st is None:
                return nn.Conv3d.forward(self, x)
            block_mask, block_size = st
        state = _state(self)
        if self._dense_fallback:  # a conv the op cannot run: dense conv x output mask (exact)
            y = nn.Conv3d.forward(self, x)
            vox = state.voxels(y.shape[2:])
            return y if vox is None else torch.where(vox, y, 0.0)
        y = super().forward(x, block_mask, block_size)
        if state.coarse == "any" and state.block_mask is not None:
            # The op makes outputs finer than a cell dense; "any" pooling masks them instead.
            vox = state.voxels(y.shape[2:])
            y = y if vox is None else torch.where(vox, y, 0.0)
        return y


class _MaskedInstanceNorm3d(MaskedInstanceNorm3d):
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return super().forward(x, mask if mask is not None else _state(self).voxels(x.shape[2:]))


class _MaskedBatchNorm3d(MaskedBatchNorm3d):
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return super().forward(x, mask if mask is not None else _state(self).voxels(x.shape[2:]))


class MaskedMaxPool3d(nn.MaxPool3d):
    """MaxPool3d over visible voxels only; output re-masked at its resolution."""

    def forward(self, x: Tensor) -> Tensor:
        vin = _state(self).voxels(x.shape[2:])
        if vin is None:
            return super().forward(x)
        y = super().forward(torch.where(vin, x, float("-inf")))
        vout = _state(self).voxels(y.shape[2:])
        keep = torch.isfinite(y) if vout is None else (vout & torch.isfinite(y))
        return torch.where(keep, y, 0.0)


class MaskedAvgPool3d(nn.AvgPool3d):
    """AvgPool3d on the zero-filled input, output re-masked (SparK / S3D). With aligned block
    masks and windows inside one block (kernel = stride <= block size) it averages visible
    voxels only."""

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        vout = _state(self).voxels(y.shape[2:])
        return y if vout is None else torch.where(vout, y, 0.0)


_SWAPS: dict[type, type] = {
    nn.Conv3d: _MaskedConv3d, SparseConv3d: _MaskedConv3d,
    nn.InstanceNorm3d: _MaskedInstanceNorm3d, MaskedInstanceNorm3d: _MaskedInstanceNorm3d,
    nn.BatchNorm3d: _MaskedBatchNorm3d, MaskedBatchNorm3d: _MaskedBatchNorm3d,
    nn.MaxPool3d: MaskedMaxPool3d, nn.AvgPool3d: MaskedAvgPool3d,
}
_NOT_MASK_AWARE = (nn.ConvTranspose3d, nn.GroupNorm, nn.LayerNorm, nn.AdaptiveAvgPool3d,
                   nn.AdaptiveMaxPool3d, nn.Conv3d, nn.InstanceNorm3d, nn.BatchNorm3d,
                   nn.MaxPool3d, nn.AvgPool3d)


def sparsify(model: nn.Module, *, strict: bool = False) -> nn.Module:
    """Convert, in place, the 3D convs, norms and pools of ``model`` into mask-aware versions that
    share one ``MaskState``; returns the model. state_dict keys and values are unchanged.

    Only modules of exactly these torch (or mae3d) classes are converted: a subclass may have its
    own forward, which a class swap would drop. A Conv3d the sparse op cannot run (kernel not
    cubic 1/2/3, dilation, groups, padding mode) becomes a dense conv whose output is re-masked
    (exact, not faster). Layers left dense or converted inexactly get a warning naming them;
    ``strict=True`` raises instead. Converting twice is a no-op.
    """
    state = getattr(model, _STATE_ATTR, None) or MaskState()
    object.__setattr__(model, _STATE_ATTR, state)
    for name, mod in model.named_modules():
        label = name or type(model).__name__
        new = _SWAPS.get(type(mod))
        if new is _MaskedConv3d:
            try:
                sparse_conv_args(mod)
            except ValueError as e:
                _complain(strict, f"sparsify: {label} runs as dense conv + re-mask: {e}")
                mod._dense_fallback = True
        if new is not None:
            mod.__class__ = new
        elif isinstance(mod, _NOT_MASK_AWARE) and type(mod) not in _SWAPS.values():
            _complain(strict, f"sparsify: {label} ({type(mod).__name__}) is not mask-aware and "
                              "runs dense")
        object.__setattr__(mod, _STATE_ATTR, state)
    return model


def _complain(strict: bool, msg: str) -> None:
    if strict:
        raise ValueError(msg)
    warnings.warn(msg, stacklevel=3)


@contextlib.contextmanager
def active_mask(model: nn.Module, block_mask: Tensor, block_size: int,
                coarse: str = "dense") -> Iterator[MaskState]:
    """Run ``model`` (converted by ``sparsify``) with ``block_mask`` (B, gD, gH, gW), True =
    visible, of ``block_size`` voxels per cell at the model's input resolution. ``coarse``:
    "dense" or "any", for stages coarser than the mask grid. Nests; restores the previous mask."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("active_mask: the model was not converted by mae3d.sparsify")
    if coarse not in ("dense", "any"):
        raise ValueError(f"active_mask: coarse must be 'dense' or 'any', got {coarse!r}")
    if block_mask.dim() != 4 or block_mask.dtype not in (torch.bool, torch.uint8):
        raise ValueError("active_mask: block_mask must be a bool (B, gD, gH, gW) tensor")
    prev = (state.block_mask, state.block_size, state.coarse)
    state.block_mask, state.block_size, state.coarse = block_mask.bool(), int(block_size), coarse
    try:
        yield state
    finally:
        state.block_mask, state.block_size, state.coarse = prev


def mask_input(x: Tensor, block_mask: Tensor, block_size: int) -> Tensor:
    """x (B, C, D, H, W) with masked voxels set to 0 (what the first sparse layer expects)."""
    return torch.where(upsample_block_mask(block_mask, block_size, x.shape[2:]), x, 0.0)
