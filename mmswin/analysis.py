"""Parameter and FLOP counting with mmengine's analyzer, including ``scaled_dot_product_attention``.

FLOPs follow the convention of the Swin papers' tables: one multiply-add counts as one FLOP.
"""
from typing import Any, List, Tuple

import torch
from mmengine.analysis import FlopAnalyzer
from torch import nn


def _shape(value: Any) -> List[int]:
    return value.type().sizes()


def _sdpa_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """``q @ k^T`` and ``attn @ v``: ``prod(batch) * L * S * (E + Ev)`` multiply-adds."""
    q, k, v = (_shape(x) for x in inputs[:3])
    batch = 1
    for dim in q[:-2]:
        batch *= dim
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def count_flops(model: nn.Module, inputs: Tuple[Any, ...]) -> int:
    """FLOPs (multiply-adds) of ``model(*inputs)``."""
    analyzer = FlopAnalyzer(model, inputs)
    analyzer.set_op_handle('aten::scaled_dot_product_attention', _sdpa_flops)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return int(analyzer.total())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def backbone_flops(model: nn.Module, height: int, width: int, batch: int = 1) -> int:
    """FLOPs of a backbone on a ``(batch, 3, height, width)`` input."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return count_flops(model, (torch.zeros(batch, 3, height, width),))
    finally:
        model.train(was_training)
