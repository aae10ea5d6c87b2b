"""The recipe's optimizer: AdamW, fused on the CPU, against the update written out by hand."""

from __future__ import annotations

import pytest
import torch

from moka_train.training.optimizer import build_adamw


def reference_adamw(
    values: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: float, weight_decay: float
) -> list[torch.Tensor]:
    """Loshchilov & Hutter's AdamW with torch's defaults (betas 0.9 / 0.999, eps 1e-8), in float64; the decay on
    matrices only (vectors: biases, norm gains)."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    params = [v.double().clone() for v in values]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            g = g.double()
            if params[i].ndim >= 2:
                params[i] *= 1 - lr * weight_decay
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat, v_hat = m[i] / (1 - beta1**t), v[i] / (1 - beta2**t)
            params[i] -= lr * m_hat / (v_hat.sqrt() + eps)
    return params


def test_fused_on_the_cpu_and_equal_to_the_written_out_update():
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 64), (64, 4), (64,), (3, 5, 7)]
    values = [torch.randn(s, generator=generator) for s in shapes]
    grads = [[torch.randn(s, generator=generator) for s in shapes] for _ in range(6)]
    params = [torch.nn.Parameter(v.clone()) for v in values]
    optimizer = build_adamw(params, lr=1e-2, weight_decay=0.1)
    assert optimizer.defaults["fused"] is True

    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()

    expected = reference_adamw(values, grads, lr=1e-2, weight_decay=0.1)
    for p, e, v in zip(params, expected, values, strict=True):
        assert not torch.equal(p.detach(), v)  # it moved
        torch.testing.assert_close(p.detach().double(), e, rtol=0, atol=2e-6)


def test_weight_decay_spares_the_vectors():
    """With zero gradients AdamW's step is the decay alone: a matrix shrinks by lr x weight_decay, a bias or a norm
    gain stays."""
    matrix, vector = torch.nn.Parameter(torch.ones(3, 4)), torch.nn.Parameter(torch.ones(4))
    optimizer = build_adamw([matrix, vector], lr=0.1, weight_decay=0.5)
    matrix.grad, vector.grad = torch.zeros(3, 4), torch.zeros(4)
    optimizer.step()
    assert torch.equal(matrix.detach(), torch.full((3, 4), 1 - 0.1 * 0.5))
    assert torch.equal(vector.detach(), torch.ones(4))
    assert len(build_adamw([matrix, vector], lr=0.1, weight_decay=0.0).param_groups) == 1  # the old layout


def test_a_parameter_without_gradient_is_left_untouched():
    # DeepSpeedEngine skips a step by withholding every gradient: nothing may move, moments included.
    stepped, skipped = torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.full((8,), 2.0))
    optimizer = build_adamw([stepped, skipped], lr=0.1, weight_decay=0.5)
    stepped.grad = torch.ones(8)
    optimizer.step()
    assert torch.equal(skipped.detach(), torch.full((8,), 2.0))
    assert skipped not in optimizer.state or not optimizer.state[skipped]
    assert not torch.equal(stepped.detach(), torch.ones(8))


def test_resumed_optimizer_continues_the_same_updates():
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(16, generator=generator) for _ in range(4)]

    def run(split: int | None) -> torch.Tensor:
        param = torch.nn.Parameter(torch.linspace(-1, 1, 16))
        optimizer = build_adamw([param], lr=1e-2, weight_decay=0.01)
        for i, g in enumerate(grads):
            if i == split:  # a fresh optimizer from the saved state, as a resume builds it
                state = optimizer.state_dict()
                optimizer = build_adamw([param], lr=1e-2, weight_decay=0.01)
                optimizer.load_state_dict(state)
            param.grad = g.clone()
            optimizer.step()
        return param.detach()

    assert torch.equal(run(split=2), run(split=None))


def test_no_trainable_parameters_is_refused():
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_adamw([], lr=1e-3, weight_decay=0.0)
