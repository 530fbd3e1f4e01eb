"""Forward FLOPs per image of any network, measured by ``torch.utils.flop_counter``.

No hand counting: ``FlopCounterMode`` counts every matmul, convolution and attention kernel the
forward pass dispatches (2 FLOPs per multiply-add; bias adds, norms and activations are not
counted, as in the DiT paper's Gflops, Peebles & Xie 2023, Sec. 3.3). One function measures the
UNet and the DiT the same way. On the CPU, ``scaled_dot_product_attention`` runs a kernel
(``_scaled_dot_product_flash_attention_for_cpu``) that torch's table leaves out; it is counted
here with torch's own attention formula.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import flop_counter

__all__ = ["count_flops"]


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: _cpu_attention_flops}


def count_flops(
    net: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
) -> int:
    """FLOPs of one forward pass ``net(x, t, y)`` per image.

    Args:
        net: a denoising network ``net(x, t, y) -> (B, C', H, W)`` (``UNet``, ``DiT``).
        x: (B, C, H, W) input batch; t: (B,) timesteps; y: (B,) labels or None.

    Returns:
        total counted FLOPs divided by B (an integer; the count is exactly linear in B).
    """
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), counter:
            net(x, t) if y is None else net(x, t, y)
    finally:
        net.train(was_training)
    return int(counter.get_total_flops()) // x.shape[0]
