"""The CPU ops of `adamoe.ops` against PyTorch's own."""

import pytest
import torch
import torch.nn.functional as F

from adamoe.ops import _LinearCrossEntropy, attention, dropout, linear_cross_entropy, math_attention


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 rows, so that 150 rows are two blocks and a part block."""
    monkeypatch.setattr(_LinearCrossEntropy, "rows", staticmethod(lambda h, V: 64))


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_linear_cross_entropy_matches_torch_in_value_and_gradient(small_blocks, autocast, smoothing):
    torch.manual_seed(0)
    h = torch.randn(150, 16, requires_grad=True)
    weight = torch.randn(37, 16, requires_grad=True)
    target = torch.randint(0, 37, (150,))
    target[::7] = 0  # padding
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        smoothed, nll = linear_cross_entropy(h, weight, target, 0, smoothing)
    assert smoothed.dtype == nll.dtype == torch.float32
    # The reference sees the logits in the precision the op computes them in.
    h_ref, w_ref = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    dtype = torch.bfloat16 if autocast else torch.float32
    logits = F.linear(h_ref.to(dtype), w_ref.to(dtype)).float()
    want_smoothed = F.cross_entropy(logits, target, ignore_index=0, label_smoothing=smoothing)
    want_nll = F.cross_entropy(logits, target, ignore_index=0)
    torch.testing.assert_close(smoothed, want_smoothed)
    torch.testing.assert_close(nll, want_nll)
    # Both outputs carry gradient: weigh them differently to see each one's share.
    (2 * smoothed + 0.5 * nll).backward()
    (2 * want_smoothed + 0.5 * want_nll).backward()
    tol = {} if not autocast else {"atol": 2e-3, "rtol": 2e-2}
    torch.testing.assert_close(h.grad, h_ref.grad, **tol)
    torch.testing.assert_close(weight.grad, w_ref.grad, **tol)
    assert h.grad[::7].abs().sum() == 0


def test_linear_cross_entropy_of_nll_alone_has_its_own_gradient():
    torch.manual_seed(1)
    h, weight = torch.randn(20, 5, requires_grad=True), torch.randn(11, 5, requires_grad=True)
    target = torch.randint(1, 11, (20,))
    linear_cross_entropy(h, weight, target, 0, 0.3)[1].backward()
    want = torch.autograd.grad(F.cross_entropy(F.linear(h, weight), target), (h, weight))
    torch.testing.assert_close(h.grad, want[0])
    torch.testing.assert_close(weight.grad, want[1])


def test_linear_cross_entropy_makes_no_gradients_without_grad_mode(monkeypatch):
    made = []
    monkeypatch.setattr(torch, "mm", lambda *a, _mm=torch.mm, **k: made.append(1) or _mm(*a, **k))
    h, weight = torch.randn(20, 5, requires_grad=True), torch.randn(11, 5, requires_grad=True)
    with torch.no_grad():
        smoothed, nll = linear_cross_entropy(h, weight, torch.randint(0, 11, (20,)), -100, 0.1)
    assert len(made) == 1 and not smoothed.requires_grad  # the logits' matmul, and no gradient matmuls
    linear_cross_entropy(h, weight, torch.randint(0, 11, (20,)), -100, 0.1)
    assert len(made) == 3


def test_dropout_keeps_the_right_share_independently_and_scales():
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5
    x.requires_grad_()
    y = dropout(x, 0.3)
    keep = y.detach() != 0
    # 1e6 Bernoulli(0.7) draws: the standard error of the rate is 0.00046.
    assert abs(keep.float().mean().item() - 0.7) < 0.003
    torch.testing.assert_close(y[keep], x[keep] / 0.7)
    # Neighbours (the four values of one hash word, and across words) are uncorrelated.
    k = keep.float().flatten()
    for lag in (1, 2, 3, 4, 1000):
        assert abs(torch.corrcoef(torch.stack([k[:-lag], k[lag:]]))[0, 1].item()) < 0.01, lag
    y.sum().backward()
    torch.testing.assert_close(x.grad, keep.float() / 0.7)


def test_dropout_follows_torch_seed_and_differs_between_calls():
    x = torch.ones(10000)
    torch.manual_seed(5)
    a, b = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.5), a)
    # Two independent masks agree on about half the elements at p = 0.5.
    assert abs((a == b).float().mean().item() - 0.5) < 0.03
    assert torch.equal(dropout(x, 0.5, training=False), x) and torch.equal(dropout(x, 0.0), x)


@pytest.mark.parametrize("causal", [False, True])
def test_math_attention_matches_sdpa(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    mask = None if causal else torch.rand(3, 1, 1, 9) > 0.3
    if mask is not None:
        mask[..., 0] = True  # every query sees a key
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(math_attention(q, k, v, mask, 0.0, causal), want)


def test_bf16_attention_with_gradient_is_close_to_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    q.requires_grad_()
    mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    mask[0, ..., 10:] = False
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (want_grad,) = torch.autograd.grad(want.sum(), q)
    qb = q.detach().bfloat16().requires_grad_()
    got = attention(qb, k.bfloat16(), v.bfloat16(), mask)
    torch.testing.assert_close(got.float(), want.detach(), atol=3e-2, rtol=3e-2)
    got.float().sum().backward()
    torch.testing.assert_close(qb.grad.float(), want_grad, atol=5e-2, rtol=5e-2)
