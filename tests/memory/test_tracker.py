"""The step tracker against a model whose whole-step peak is known in closed form, to the byte."""

import weakref

import pytest
import torch
from torch import nn

from safefreeze.memory.tracker import CATEGORIES, track_step

LAYERS, WIDTH, ROWS = 4, 16, 64
P = LAYERS * WIDTH * WIDTH * 4  # fp32 weights
D = WIDTH * WIDTH * 4  # one weight, or its gradient
A = ROWS * WIDTH * 4  # one activation x_i (ROWS x WIDTH)


class Stack(nn.Module):
    """x_{i+1} = x_i @ W_i, loss = sum(x_L): every product saves x_i (W_i needs its gradient), x_i needs none
    for i = 0, so the bottom product saves only x_0."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(WIDTH, WIDTH)) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for weight in self.weights:
            x = x @ weight
        return x.sum()


def expected_peak(optimizer_state: int) -> dict[str, int]:
    """The peak with A > D: in the backward of the second product from the top (its inputs x_0..x_{L-2} still
    saved; the top weight's gradient accumulated; the incoming gradient, the gradients of x_{L-2} and of
    W_{L-2} just made; the loss and the 1 backward starts from, 4 bytes each). The top product's backward
    holds one activation and one incoming gradient less (its incoming gradient is the loss's, expanded: a
    view of 4 bytes), the forward's end D + A - 4 less."""
    return {
        "parameters": P,
        "gradients": D,
        "optimizer_state": optimizer_state,
        "activations": (LAYERS - 1) * A,
        "temporaries": 2 * A + D + 8,
    }


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor):
    with track_step(model, optimizer) as peak:
        model(x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return peak.result


@pytest.mark.parametrize(
    ("make", "state_after_first_step"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 0),
        # Adam: exp_avg and exp_avg_sq per weight, and a float32 step count per weight
        (lambda p: torch.optim.Adam(p, lr=0.1, foreach=False), 2 * P + 4 * LAYERS),
        (lambda p: torch.optim.AdamW(p, lr=0.1, foreach=True), 2 * P + 4 * LAYERS),
    ],
)
def test_the_peak_is_the_closed_form_to_the_byte(make, state_after_first_step):
    torch.manual_seed(0)
    model = Stack()
    optimizer = make(model.parameters())
    x = torch.randn(ROWS, WIDTH)
    first, second = train_step(model, optimizer, x), train_step(model, optimizer, x)
    assert first.by_category == expected_peak(0)  # the first step makes the state after the peak
    assert first.bytes == sum(expected_peak(0).values()) == P + 2 * D + (LAYERS + 1) * A + 8
    assert second.by_category == expected_peak(state_after_first_step)
    assert second.bytes == sum(expected_peak(state_after_first_step).values())
    assert set(second.by_category) == set(CATEGORIES)


def test_views_count_once_and_no_finalizer_outlives_the_step():
    model = Stack()
    x = torch.randn(ROWS, WIDTH)
    registered = len(weakref.finalize._registry)
    with track_step(model) as peak:
        views = [x.view(-1), x.t(), x[: ROWS // 2], x.unsqueeze(0)]  # x's storage, seen 4 times, counted once
        copy = views[1].contiguous()  # a new storage
        del views, copy
    assert len(weakref.finalize._registry) == registered
    assert peak.result.bytes == P + 2 * A
    assert peak.result.by_category == {**dict.fromkeys(CATEGORIES, 0), "parameters": P, "temporaries": 2 * A}


def test_a_released_storage_leaves_the_count():
    model = Stack()
    with track_step(model) as peak:
        big = torch.empty(10_000)  # 40 kB, released at once
        del big
        small = torch.empty(10)
    assert peak.result.bytes == P + 40_000
    assert peak.result.by_category["temporaries"] == 40_000
    del small
