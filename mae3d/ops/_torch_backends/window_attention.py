"""``window_attention3d``'s reference backend, with the kernels' conventions:
fwd(q, k, v, table, ws, ss, bw, scale) -> (out, lse);
bwd(grad_out, q, k, v, out, lse, table, ws, ss, bw, scale) -> (dq, dk, dv, dtable or empty)."""

from __future__ import annotations

from mae3d.ops._checks import acc_dtype
from mae3d.reference.window_attention import (
    window_attention3d_reference_backward,
    window_attention3d_reference_lse,
)


def fwd(q, k, v, table, ws, ss, bw, scale):
    acc = acc_dtype(q.dtype)
    tab = None if table is None else table.to(acc)
    out, lse = window_attention3d_reference_lse(q.to(acc), k.to(acc), v.to(acc), ws, ss, tab,
                                                scale, bias_window_size=bw)
    return out.to(q.dtype), lse


def bwd(grad_out, q, k, v, out, lse, table, ws, ss, bw, scale):
    # Autograd does not run inside a custom op's implementation: closed-form gradients.
    acc = acc_dtype(q.dtype)
    tab = None if table is None else table.to(acc)
    dq, dk, dv, dt = window_attention3d_reference_backward(
        grad_out.to(acc), q.to(acc), k.to(acc), v.to(acc), ws, ss, tab, scale,
        bias_window_size=bw)
    dt = dt.to(table.dtype) if table is not None else q.new_empty(0)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dt
