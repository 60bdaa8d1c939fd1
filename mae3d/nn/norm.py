"""Masked norms: nn.InstanceNorm3d / nn.BatchNorm3d whose statistics cover visible voxels only.

Subclasses of the torch modules: same constructor, parameters, buffers and state_dict, so their
checkpoints load unchanged and ``isinstance`` checks keep working. ``forward(x, mask)`` calls
``mae3d.ops.masked_norm``; without a mask it is the torch module's forward.
"""

from __future__ import annotations

from torch import Tensor, nn

from mae3d.ops import masked_norm


class MaskedInstanceNorm3d(nn.InstanceNorm3d):
    """nn.InstanceNorm3d over visible voxels: statistics per (sample, channel), as in S3D.

    ``negative_slope`` (attribute, default None) fuses a LeakyReLU after the affine, the way the
    nnU-Net conv block follows its norm; ``forward`` then returns the activated output.
    """

    negative_slope: float | None = None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, C, D, H, W); mask broadcastable to (B, 1, D, H, W), True = visible."""
        if mask is None and self.negative_slope is None:
            return super().forward(x)
        use_running = self.track_running_stats and self.running_mean is not None
        return masked_norm(
            x, mask, self.weight, self.bias, mode="instance", eps=self.eps,
            negative_slope=self.negative_slope,
            running_mean=self.running_mean if use_running else None,
            running_var=self.running_var if use_running else None,
            momentum=self.momentum if self.momentum is not None else 0.0,
            training=self.training or not self.track_running_stats,
        )


class MaskedBatchNorm3d(nn.BatchNorm3d):
    """nn.BatchNorm3d over visible voxels: statistics per channel over the batch, as in SparK.

    In training the statistics are combined across the ranks of the default process group when
    torch.distributed is initialised (SyncBatchNorm semantics, count-weighted); set the attribute
    ``process_group`` to use another group.
    """

    negative_slope: float | None = None
    process_group = None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, C, D, H, W); mask broadcastable to (B, 1, D, H, W), True = visible."""
        if mask is None and self.negative_slope is None:
            return super().forward(x)
        # Same bookkeeping as torch's _BatchNorm.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return masked_norm(
            x, mask, self.weight, self.bias, mode="batch", eps=self.eps,
            negative_slope=self.negative_slope,
            running_mean=self.running_mean if track else None,
            running_var=self.running_var if track else None,
            momentum=factor, training=bn_training, process_group=self.process_group,
        )
