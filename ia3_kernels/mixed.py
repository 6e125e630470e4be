"""Mixed-adapter batches: every example of a batch scales with its own adapter's IA3 vector.

A server holds many IA3 adapters (a few hundred KB each) and serves a batch whose examples ask
for different ones; multitask training (T-Few) gives each example its task's adapter. The ops
take the layer's vectors stacked as a table, `scale` of shape (adapters, F) with F = in_features
(feedforward) or out_features (attention), and `adapter_index` (B,) integers: example b of x
(B, ..., in) uses table row adapter_index[b]; its rows (tokens) are the consecutive M / B rows of
x flattened to (M, in). The kernels gather each row's vector from the table (L2-resident: 128
adapters x 4096 bf16 values are 1 MiB) where they would read the single vector:

* forward: the feedforward input scaling in the GEMM's K-loop reads scale[idx[m // T], k] in
  place of scale[k]; the attention epilogue reads scale[idx[m // T], n]. Where cuBLAS runs the
  GEMM, the pass that applies IA3 gathers the same way (feedforward: x*l is formed by that pass,
  since W diag(l) differs per example).
* backward: dx as in the single-adapter op with the gathered scaling; each adapter's gradient
  is the sum over its own examples only: a Triton pass reduces per example (B, F) partial sums
  in a fixed order, and a one-hot float64 product adds the examples of each adapter (exact
  selection, float64 so that no TF32 setting rounds it): deterministic, no atomics.

This module holds what every op family shares: input checks, the reference's gather, and the
per-example / per-adapter reductions.
"""
from __future__ import annotations

from typing import Optional

import torch


def check_adapter_index(where: str, x: torch.Tensor, scale: torch.Tensor,
                        adapter_index: torch.Tensor, features: int, feedforward: bool) -> None:
    """Clear errors before anything launches: the table is (adapters, features), the index one
    integer per example of x (its first dimension), on x's device, each naming a table row."""
    kind = "in_features (feedforward)" if feedforward else "out_features (attention)"
    if scale.dim() != 2 or scale.shape[1] != features or scale.shape[0] < 1:
        raise ValueError(f"{where}: a mixed-adapter batch needs a table of shape (adapters, "
                         f"{features}) with one row of {kind} per adapter, got "
                         f"{tuple(scale.shape)}")
    if adapter_index.dim() != 1 or adapter_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: adapter_index must be a 1-D int32/int64 tensor (one entry "
                         f"per example), got {adapter_index.dtype} of shape "
                         f"{tuple(adapter_index.shape)}")
    if x.dim() < 2 or x.shape[0] != adapter_index.numel():
        raise ValueError(f"{where}: adapter_index has {adapter_index.numel()} entries but x of "
                         f"shape {tuple(x.shape)} has {x.shape[0] if x.dim() >= 2 else 'no'} "
                         "examples along its first dimension")
    if adapter_index.device != x.device:
        raise ValueError(f"{where}: adapter_index is on {adapter_index.device}, x on {x.device}")
    if adapter_index.device.type == "cpu" and adapter_index.numel():
        # On the GPU the range check would cost a device sync per layer call: the layers build
        # their indices on the host from adapter names, checked there (ia3.mixed).
        low, high = int(adapter_index.min()), int(adapter_index.max())
        if low < 0 or high >= scale.shape[0]:
            raise ValueError(f"{where}: adapter_index values must lie in [0, {scale.shape[0]}) "
                             f"(the table's rows), got values from {low} to {high}")


def gathered_scale(scale: torch.Tensor, adapter_index: Optional[torch.Tensor], x_dim: int
                   ) -> torch.Tensor:
    """The reference's scaling, broadcastable against x (B, ..., F): the vector itself, or each
    example's table row shaped (B, 1, ..., 1, F)."""
    if adapter_index is None:
        return scale.reshape(-1)
    # The feature count is spelled out: an empty batch has no rows to infer a -1 from.
    return scale[adapter_index].reshape(adapter_index.numel(), *([1] * (x_dim - 2)),
                                        scale.shape[-1])


def gathered_rows(scale: torch.Tensor, adapter_index: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, F): each row's table row, rows split evenly over the examples (the rarely taken
    paths that build a scaled copy in PyTorch: a weight gradient)."""
    return scale[row_index(adapter_index, rows)]


def rows_per_example(adapter_index: Optional[torch.Tensor], rows: int) -> int:
    """How many consecutive GEMM rows each example of a mixed batch owns (the kernels' divisor
    from a row to its table index); 1 without a mixed batch (the argument then goes unused)."""
    return rows // adapter_index.numel() if adapter_index is not None else 1


def row_index(adapter_index: torch.Tensor, rows: int) -> torch.Tensor:
    """One table row per GEMM row (int32), for passes over row slices of the batch."""
    return adapter_index.to(torch.int32).repeat_interleave(rows // max(1, adapter_index.numel()))


def example_sums(src: torch.Tensor, aux: Optional[torch.Tensor], adapter_index: torch.Tensor, *,
                 traceable: bool, scale: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None):
    """One pass over src (M, C) seen as B examples of M / B rows: out = src * scale[idx[b]]
    (when out is given; may alias src) and, when aux is given, per-example sums of src * aux.
    Returns (out, sums (B, C) float32 or None)."""
    from .dense import _launch_scale_reduce

    B = adapter_index.numel()
    M, C = src.shape
    T = M // B
    strides = lambda t: (0, 0, 0) if t is None else (T * t.stride(0), t.stride(0), t.stride(1))  # noqa: E731
    _, partial = _launch_scale_reduce(
        src, scale=scale, scale_axis=1, out=out, aux=aux, traceable=traceable,
        batched=((B, T, C), strides(src), strides(out), strides(aux)),
        scale_index=adapter_index if scale is not None else None)
    if aux is None:
        return out, None
    # partial: B x (row programs) x C, each example's programs consecutive; summed in order.
    return out, partial.view(B, -1, C).sum(1)


def adapter_sums(per_example: torch.Tensor, adapter_index: torch.Tensor, adapters: int,
                 like: torch.Tensor) -> torch.Tensor:
    """(adapters, C) in like's dtype: row a = the sum of the examples that use adapter a. The
    one-hot selection is exact and float64 accumulates, in a fixed order whatever the TF32
    settings: deterministic."""
    onehot = (adapter_index.view(-1, 1) == torch.arange(adapters, device=adapter_index.device)
              ).to(torch.float64)
    return (onehot.t() @ per_example.to(torch.float64)).to(like.dtype).view(like.shape)


def mixed_backward(dy, x, scale, preact, adapter_index, feedforward: bool, need_dx: bool,
                   need_dscale: bool, grad_input, traceable: bool):
    """(dx, dscale) of a mixed-adapter batch for any weight format. grad_input(a, scaled)
    returns a W (M x in_features, the compute dtype), with a's columns scaled by each row's
    table row first when `scaled` (attention: dx = (dy*l) W, fused in the GEMM's K-loop or in
    the pass that forms dy*l). Feedforward: g = dy W, then one pass turns g into dx = g*l in
    place and reduces each example's sums of g*x; attention: a pass reduces each example's sums
    of dy*u. Each adapter's gradient sums its own examples (adapter_sums)."""
    dx = dscale = None
    if feedforward:
        g = grad_input(dy, False)
        dx, per_example = example_sums(g, x if need_dscale else None, adapter_index,
                                       scale=scale if need_dx else None,
                                       out=g if need_dx else None, traceable=traceable)
    else:
        if need_dx:
            dx = grad_input(dy, True)
        per_example = (example_sums(dy, preact, adapter_index, traceable=traceable)[1]
                       if need_dscale else None)
    if need_dscale:
        dscale = adapter_sums(per_example, adapter_index, scale.shape[0], scale)
    return dx, dscale


def mixed_bias_grad(dy: torch.Tensor, scale: torch.Tensor, adapter_index: torch.Tensor,
                    feedforward: bool) -> torch.Tensor:
    """The bias gradient (N,) in float32: sum_rows dy, and for attention layers (y = (xW^T + b)
    * l) each example's row sums times its own l."""
    if feedforward:
        return dy.sum(0, dtype=torch.float32)
    B = adapter_index.numel()
    per_example = dy.view(B, -1, dy.shape[1]).sum(1, dtype=torch.float32)
    return (per_example * scale[adapter_index].float()).sum(0)
