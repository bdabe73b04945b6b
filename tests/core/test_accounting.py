import torch
import torch.nn.functional as F

from safefreeze.core import accounting


def test_attention_counts_the_same_with_and_without_dropout():
    """Without dropout SDPA on CPU runs a flash kernel PyTorch's counter does not know; the
    forward must still cost its two matmuls, 2·B·H·L·S·d each, as the math path (dropout) does."""
    batch, heads, length, dim = 2, 4, 16, 8
    q, k, v = (torch.randn(batch, heads, length, dim, requires_grad=True) for _ in range(3))
    forward = {}
    for dropout in (0.0, 0.1):
        with accounting.flop_counter() as counter:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        forward[dropout] = counter.get_total_flops()
        with accounting.flop_counter() as counter:
            out.sum().backward()
        assert counter.get_total_flops() > 0
    assert forward[0.0] == forward[0.1] == 2 * (2 * batch * heads * length * length * dim)
