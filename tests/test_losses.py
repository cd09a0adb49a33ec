"""Tests for losses.py: float64 gradchecks, the SDL gradient identity, exact enumeration over a small vocabulary
(which estimator follows which KL), masking / padding / num_tokens semantics, chunked == unchunked kernels,
and gradient accumulation over 2 gloo processes x 2 micro-batches."""
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import losses

from losses import (group_advantages, grpo_loss, masked_mean, reverse_kl_full, sdl_full_loss, sdl_loss,
                    token_entropy, token_logprobs)

f64 = torch.float64


def _batch(seed=0, B=3, T=5, dtype=f64, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 3                     # (B, T) log-probs < 0
    logp_old = logp + (torch.rand(B, T, generator=g, dtype=dtype) - 0.5) * 2 * spread
    logp_teacher = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    mask = (torch.rand(B, T, generator=g) > 0.3).to(dtype)
    mask[:, 0] = 1
    adv = torch.randn(B, generator=g, dtype=dtype)
    return logp, logp_old, logp_teacher, mask, adv


# ---------------------------------------------------------------------------------------------- advantages

def test_group_advantages_population_std_and_zero_variance_groups():
    r = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.25, 0.0], [0.1, 0.1, 0.1, 0.1]])
    adv, frac = group_advantages(r)
    for p, row in enumerate(r.tolist()):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / len(row))          # population std
        want = [0.0] * len(row) if std == 0 or len(set(row)) == 1 else [(x - mean) / (std + 1e-6) for x in row]
        assert adv[p].tolist() == pytest.approx(want, abs=1e-6)
    assert adv[1].eq(0).all() and adv[3].eq(0).all()                           # exactly zero, not 1e-11
    assert frac == 0.5
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4))


# ---------------------------------------------------------------------------------------------- GRPO / SDL values

def test_grpo_matches_per_token_reference_and_asymmetric_clip():
    logp, logp_old, _, mask, adv = _batch(spread=0.6)
    loss, m = grpo_loss(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.28, num_tokens=7)
    total, clipped, n = 0.0, 0, 0
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[b, t] == 0:
                continue
            r, a = math.exp(logp[b, t] - logp_old[b, t]), adv[b].item()
            total += min(r * a, min(max(r, 0.8), 1.28) * a)
            clipped += (a > 0 and r > 1.28) or (a < 0 and r < 0.8)
            n += 1
    assert loss.item() == pytest.approx(-total / 7, rel=1e-12)
    assert m["clip_frac"] == pytest.approx(clipped / n) and 0 < clipped < n  # the batch exercises both branches


def test_sdl_matches_per_token_reference_and_metrics():
    logp, logp_old, logp_teacher, mask, _ = _batch()
    loss, m = sdl_loss(logp, logp_old, logp_teacher, mask)
    total, rhos, ls = 0.0, [], []
    for a, c, b, w in zip(logp.flatten().tolist(), logp_old.flatten().tolist(), logp_teacher.flatten().tolist(),
                          mask.flatten().tolist()):
        if w:
            l, rho = a - b, math.exp(a - c)
            total += rho * (math.exp(-l) - 1 + l)
            rhos.append(rho), ls.append(l)
    assert loss.item() == pytest.approx(total / len(rhos), rel=1e-12)
    assert m["rho_max"] == pytest.approx(max(rhos)) and m["l_mean"] == pytest.approx(sum(ls) / len(ls))
    assert m["rho_mean"] == pytest.approx(sum(rhos) / len(rhos))


def test_num_tokens_divides_the_masked_sum():
    logp, logp_old, logp_teacher, mask, adv = _batch()
    for fn, args in [(grpo_loss, (logp, logp_old, adv, mask)), (sdl_loss, (logp, logp_old, logp_teacher, mask))]:
        default, _ = fn(*args)
        scaled, _ = fn(*args, num_tokens=100)
        assert scaled.item() == pytest.approx(default.item() * mask.sum().item() / 100, rel=1e-12)
        with pytest.raises(ValueError):
            fn(*args, num_tokens=0)


# ---------------------------------------------------------------------------------------------- gradients

def test_gradcheck_grpo_and_sdl_float64():
    logp, logp_old, logp_teacher, mask, adv = _batch(spread=0.6)
    logp.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: grpo_loss(x, logp_old, adv, mask, num_tokens=9)[0], (logp,))
    assert torch.autograd.gradcheck(lambda x: sdl_loss(x, logp_old, logp_teacher, mask, num_tokens=9)[0], (logp,))


def test_gradcheck_fused_kernels_float64():
    g = torch.Generator().manual_seed(1)
    h, ht = torch.randn(5, 4, generator=g, dtype=f64), torch.randn(5, 4, generator=g, dtype=f64)
    W, Wt = torch.randn(7, 4, generator=g, dtype=f64), torch.randn(7, 4, generator=g, dtype=f64)
    h.requires_grad_(), W.requires_grad_()
    tgt = torch.randint(0, 7, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: token_logprobs(a, b, tgt, chunk_size=2), (h, W))
    # A separate teacher weight: with the shared default, finite differences would also move the teacher.
    assert torch.autograd.gradcheck(lambda a, b: reverse_kl_full(a, ht, b, 2, weight_teacher=Wt), (h, W))


def test_sdl_per_token_gradient_is_rho_times_l():
    logp, logp_old, logp_teacher, mask, _ = _batch(spread=1.0)
    logp.requires_grad_()
    loss, _ = sdl_loss(logp, logp_old, logp_teacher, mask, num_tokens=11)
    (grad,) = torch.autograd.grad(loss, logp)
    rho, l = torch.exp(logp.detach() - logp_old), logp.detach() - logp_teacher
    torch.testing.assert_close(grad, mask * rho * l / 11, rtol=1e-12, atol=1e-14)


def test_no_gradient_reaches_teacher_or_old_logprobs():
    logp, logp_old, logp_teacher, mask, adv = _batch()
    for x in (logp, logp_old, logp_teacher, adv):
        x.requires_grad_()
    (grpo_loss(logp, logp_old, adv, mask)[0] + sdl_loss(logp, logp_old, logp_teacher, mask)[0]).backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    assert logp_old.grad is None and logp_teacher.grad is None and adv.grad is None


def test_masked_tokens_get_zero_gradient_even_with_garbage_padding():
    logp, logp_old, logp_teacher, mask, adv = _batch()
    pad = mask == 0
    adv = adv[:, None].expand_as(logp).clone()
    for x, v in ((logp, -1e4), (logp_old, float("inf")), (logp_teacher, float("nan")), (adv, float("nan"))):
        x[pad] = v
    logp.requires_grad_()
    for loss, _ in (grpo_loss(logp, logp_old, adv, mask), sdl_loss(logp, logp_old, logp_teacher, mask)):
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad[pad].eq(0).all() and grad[~pad].abs().sum() > 0


def test_extra_padding_does_not_change_loss_or_gradient():
    logp, logp_old, logp_teacher, mask, adv = _batch()
    g = torch.Generator().manual_seed(5)
    padded = [torch.cat([x, -torch.rand(x.shape[0], 4, generator=g, dtype=f64) * 9], 1)
              for x in (logp, logp_old, logp_teacher)]
    pmask = torch.cat([mask, torch.zeros(mask.shape[0], 4, dtype=f64)], 1)
    for x in (logp, padded[0]):
        x.requires_grad_()
    for fn, a, b in [(grpo_loss, (logp, logp_old, adv, mask), (padded[0], padded[1], adv, pmask)),
                     (sdl_loss, (logp, logp_old, logp_teacher, mask), (*padded, pmask))]:
        (la, ma), (lb, mb) = fn(*a), fn(*b)
        torch.testing.assert_close(la, lb, rtol=1e-14, atol=0)
        assert ma == pytest.approx(mb, rel=1e-12)
        ga, gb = torch.autograd.grad(la, logp)[0], torch.autograd.grad(lb, padded[0])[0]
        torch.testing.assert_close(ga, gb[:, :logp.shape[1]], rtol=1e-14, atol=0)


def test_zero_advantages_give_zero_grpo_gradient():
    logp, logp_old, _, mask, _ = _batch(spread=0.6)
    logp.requires_grad_()
    loss, _ = grpo_loss(logp, logp_old, torch.zeros(logp.shape[0], dtype=f64), mask)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0 and grad.eq(0).all()


# ---------------------------------------------------------------------------------------------- exact enumeration
# One position, a softmax policy over V tokens with logits theta; expectations over y ~ pi_old are exact sums.

def _policies(seed, on_policy):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(6, generator=g, dtype=f64, requires_grad=True)
    theta_old = theta.detach().clone() if on_policy else torch.randn(6, generator=g, dtype=f64)
    log_pt = torch.log_softmax(torch.randn(6, generator=g, dtype=f64) * 2, 0)   # teacher, detached
    return theta, torch.log_softmax(theta_old, 0), log_pt


def _expected_grad(theta, log_pold, per_token_loss):
    """sum_y pi_old(y) grad_theta loss(y): the exact expectation of a sampled-token gradient estimator."""
    total = torch.zeros_like(theta)
    for y in range(theta.shape[0]):
        logp = torch.log_softmax(theta, 0)[y]
        total += log_pold[y].exp() * torch.autograd.grad(per_token_loss(logp, y), theta)[0]
    return total


def _kl_grad(theta, log_pt, reverse):
    logp = torch.log_softmax(theta, 0)
    kl = (logp.exp() * (logp - log_pt)).sum() if reverse else (log_pt.exp() * (log_pt - logp)).sum()
    return torch.autograd.grad(kl, theta)[0]


@pytest.mark.parametrize("on_policy", [True, False], ids=["theta_eq_old", "theta_ne_old"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sdl_expected_gradient_is_reverse_kl_gradient(seed, on_policy):
    theta, log_pold, log_pt = _policies(seed, on_policy)
    one = torch.ones(1, 1, dtype=f64)
    sdl = lambda logp, y: sdl_loss(logp.view(1, 1), log_pold[y].view(1, 1), log_pt[y].view(1, 1), one)[0]
    want = _kl_grad(theta, log_pt, reverse=True)
    assert want.abs().max() > 1e-2                                            # a non-trivial target
    torch.testing.assert_close(_expected_grad(theta, log_pold, sdl), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("on_policy", [True, False], ids=["theta_eq_old", "theta_ne_old"])
def test_sdl_expected_loss_is_reverse_kl(on_policy):
    theta, log_pold, log_pt = _policies(3, on_policy)
    logp = torch.log_softmax(theta.detach(), 0)
    one = torch.ones(1, 1, dtype=f64)
    expected = sum(log_pold[y].exp() * sdl_loss(logp[y].view(1, 1), log_pold[y].view(1, 1),
                                                 log_pt[y].view(1, 1), one)[0] for y in range(6))
    assert expected.item() == pytest.approx((logp.exp() * (logp - log_pt)).sum().item(), abs=1e-12)


def test_k3_without_rho_follows_forward_kl():
    """On-policy, grad (e^-l - 1 + l) = (1 - pi_T / pi_theta) grad logp, whose mean is -sum_y pi_T grad logp
    = grad KL(pi_T || pi_theta): the forward KL (mode covering), not the reverse KL SDL is after."""
    theta, log_pold, log_pt = _policies(0, on_policy=True)
    k3 = lambda logp, y: torch.exp(log_pt[y] - logp) - 1 + (logp - log_pt[y])
    got = _expected_grad(theta, log_pold, k3)
    torch.testing.assert_close(got, _kl_grad(theta, log_pt, reverse=False), rtol=0, atol=1e-6)
    assert (got - _kl_grad(theta, log_pt, reverse=True)).abs().max() > 1e-2


def test_k1_gradient_is_zero_in_expectation():
    """On-policy, grad (logp - logp_T) = grad logp and E_{y~pi_theta}[grad log pi_theta(y)] = 0: no signal."""
    theta, log_pold, log_pt = _policies(0, on_policy=True)
    got = _expected_grad(theta, log_pold, lambda logp, y: logp - log_pt[y])
    torch.testing.assert_close(got, torch.zeros_like(got), rtol=0, atol=1e-12)
    assert _kl_grad(theta, log_pt, reverse=True).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------- full-vocabulary SDL
# Positions n with student hidden states h (n, C) and head W (V, C); the teacher's ht, Wt; all float64.

def _full_inputs(n=4, C=3, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, W = torch.randn(n, C, generator=g, dtype=f64), torch.randn(V, C, generator=g, dtype=f64)
    ht, Wt = torch.randn(n, C, generator=g, dtype=f64), torch.randn(V, C, generator=g, dtype=f64)
    return h.requires_grad_(), W.requires_grad_(), ht, Wt


def test_sdl_full_value_and_gradient_are_the_exact_reverse_kl():
    h, W, ht, Wt = _full_inputs(n=5)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.5, 1.0], dtype=f64)                  # a weight and an untaught row
    ht = ht.clone()
    ht[1] = float("nan")                                                        # garbage where mask == 0
    loss, m = sdl_full_loss(h, W, ht, Wt, mask, num_tokens=7, chunk_size=2)
    ref_kl = []
    for i in range(5):                                                          # enumerate y = 0..V-1 per row
        logp, logp_t = torch.log_softmax(h[i] @ W.T, 0), torch.log_softmax(ht[i] @ Wt.T, 0)
        ref_kl.append(sum(logp[y].exp() * (logp[y] - logp_t[y]) for y in range(6)) if mask[i] else 0.0)
    ref = sum(w * k for w, k in zip(mask, ref_kl)) / 7
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    assert m["kl_mean"] == pytest.approx(ref.item() * 7 / mask.sum().item(), rel=1e-12)
    got, want = torch.autograd.grad(loss, (h, W)), torch.autograd.grad(ref, (h, W))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert got[0][1].eq(0).all() and torch.isfinite(got[1]).all() and got[1].abs().max() > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_sdl_full_is_the_k3_estimator_averaged_over_the_sampled_token(seed):
    """theta != theta_old: sum_y pi_old(y) sdl_loss(y) at each position equals sdl_full_loss, value and gradient.
    (The existing enumeration tests show that this expectation is the reverse KL and its gradient.)"""
    h, W, ht, Wt = _full_inputs(seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    log_pold = torch.log_softmax(torch.randn(4, 6, generator=g, dtype=f64) * 1.5, 1)  # not the student's
    log_pt = torch.log_softmax(ht @ Wt.T, 1)
    one = torch.ones(1, 1, dtype=f64)
    expected = 0
    for i in range(4):
        logp = torch.log_softmax(h[i] @ W.T, 0)                                 # (V,) with grad
        for y in range(6):
            k3, _ = sdl_loss(logp[y].view(1, 1), log_pold[i, y].view(1, 1), log_pt[i, y].view(1, 1), one, num_tokens=4)
            expected = expected + log_pold[i, y].exp() * k3
    full, _ = sdl_full_loss(h, W, ht, Wt, torch.ones(4, dtype=f64), num_tokens=4, chunk_size=3)
    torch.testing.assert_close(full, expected, rtol=1e-12, atol=1e-14)
    for a, b in zip(torch.autograd.grad(full, (h, W)), torch.autograd.grad(expected, (h, W))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert b.abs().max() > 1e-2


def test_sdl_full_with_no_taught_rows_is_zero_and_backpropagates():
    h, W, ht, Wt = _full_inputs()
    loss, m = sdl_full_loss(h, W, ht, Wt, torch.zeros(4, dtype=f64), num_tokens=3)
    loss.backward()                                                             # train.py backprops every micro-batch
    assert loss.item() == 0 and m["kl_mean"] == 0 and h.grad.eq(0).all() and W.grad.eq(0).all()


def test_tf32_grads_flag_is_a_no_op_on_cpu_and_restored():
    h, ht, W, tgt, go = _kernel_inputs()
    m = torch.backends.cuda.matmul
    before = m.fp32_precision if hasattr(m, "fp32_precision") else m.allow_tf32
    res = []
    for tf32 in (False, True):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        out = token_logprobs(hh, WW, tgt, 8, tf32_grads=tf32), reverse_kl_full(hh, ht, WW, 8, tf32_grads=tf32)
        res.append([*out, *torch.autograd.grad(out, (hh, WW), (go, go))])
    assert all(torch.equal(a, b) for a, b in zip(*res))
    assert before == (m.fp32_precision if hasattr(m, "fp32_precision") else m.allow_tf32)
    with losses._tf32(True):                                                    # what a CUDA backward runs under
        assert (m.fp32_precision if hasattr(m, "fp32_precision") else m.allow_tf32) in ("tf32", True)


# ---------------------------------------------------------------------------------------------- fused kernels

def _kernel_inputs(N=37, C=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, ht = torch.randn(N, C, generator=g), torch.randn(N, C, generator=g)
    W = torch.randn(V, C, generator=g) * 0.5
    return h, ht, W, torch.randint(0, V, (N,), generator=g), torch.randn(N, generator=g)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 1024])
def test_chunked_kernels_equal_unchunked(chunk_size):
    h, ht, W, tgt, go = _kernel_inputs()
    h.requires_grad_(), W.requires_grad_()
    ls = torch.log_softmax(h @ W.T, -1)                                        # (N, V) the naive reference
    lt = torch.log_softmax(ht @ W.detach().T, -1)
    refs = {"logp": ls.gather(1, tgt[:, None]).squeeze(1), "kl": (ls.exp() * (ls - lt)).sum(-1)}
    outs = {"logp": token_logprobs(h, W, tgt, chunk_size), "kl": reverse_kl_full(h, ht, W, chunk_size)}
    for k in refs:
        torch.testing.assert_close(outs[k], refs[k], rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(outs[k], (h, W), go), torch.autograd.grad(refs[k], (h, W), go, retain_graph=True)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ent = token_entropy(h, W, chunk_size)
    torch.testing.assert_close(ent, -(ls.exp() * ls).sum(-1).detach(), rtol=1e-5, atol=1e-5)
    assert not ent.requires_grad


def test_kernel_bf16_inputs_compute_in_fp32():
    h, _, W, tgt, go = _kernel_inputs()
    hb, Wb = h.bfloat16().requires_grad_(), W.bfloat16().requires_grad_()
    out = token_logprobs(hb, Wb, tgt, chunk_size=8)
    h32, W32 = hb.detach().float().requires_grad_(), Wb.detach().float().requires_grad_()
    ref = torch.log_softmax(h32 @ W32.T, -1).gather(1, tgt[:, None]).squeeze(1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)                 # fp32 math on the bf16 values
    gh, gW = torch.autograd.grad(out, (hb, Wb), go)
    rh, rW = torch.autograd.grad(ref, (h32, W32), go)
    assert gh.dtype == gW.dtype == torch.bfloat16
    torch.testing.assert_close(gh, rh.bfloat16()), torch.testing.assert_close(gW, rW.bfloat16())


def test_reverse_kl_teacher_side_gets_no_gradient():
    h, ht, W, _, _ = _kernel_inputs()
    h.requires_grad_(), ht.requires_grad_(), W.requires_grad_()
    Wt = (W.detach() + 0.1).requires_grad_()
    kl = reverse_kl_full(h, ht, W, 8, weight_teacher=Wt)
    kl.sum().backward()
    assert ht.grad is None and Wt.grad is None and h.grad is not None and W.grad is not None
    assert (kl > 0).all()
    assert reverse_kl_full(h, h, W, 8).abs().max() < 1e-5                      # KL(p || p) = 0


def test_kernel_rejects_bad_inputs():
    h, ht, W, tgt, _ = _kernel_inputs()
    for bad in [lambda: token_logprobs(h, W.T, tgt), lambda: token_logprobs(h, W, tgt, chunk_size=0),
                lambda: token_logprobs(h, W, tgt.clamp(max=0) - 100), lambda: token_logprobs(h, W, tgt[:5]),
                lambda: reverse_kl_full(h, ht[:3], W), lambda: grpo_loss(h, h, h[:, 0], h[:, :3]),
                lambda: sdl_loss(h, h, h[:2], torch.ones_like(h)), lambda: sdl_full_loss(h, W, ht, W, tgt[:5] * 1.0),
                lambda: sdl_full_loss(h, W, ht[:3], W, torch.ones(h.shape[0]))]:
        with pytest.raises(ValueError):
            bad()


def test_masked_mean_ignores_nan_padding():
    x, m = torch.tensor([[1.0, float("nan")], [3.0, 5.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert masked_mean(x, m).item() == pytest.approx(3.0)
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([1.0, 4.0])


# ---------------------------------------------------------------------------------------------- distributed

C, V, ROWS, T = 5, 11, 8, 6


def _dist_data():
    g = torch.Generator().manual_seed(7)
    d = dict(h=torch.randn(ROWS, T, C, generator=g, dtype=f64), tgt=torch.randint(0, V, (ROWS, T), generator=g),
             logp_old=-torch.rand(ROWS, T, generator=g, dtype=f64) * 3,
             logp_teacher=-torch.rand(ROWS, T, generator=g, dtype=f64) * 3,
             adv=torch.randn(ROWS, generator=g, dtype=f64), W=torch.randn(V, C, generator=g, dtype=f64))
    d["mask"] = (torch.rand(ROWS, T, generator=g) > torch.linspace(0.1, 0.8, ROWS)[:, None]).to(f64)  # uneven counts
    return d


def _dist_loss(d, W, rows, num_tokens):
    logp = token_logprobs(d["h"][rows].reshape(-1, C), W, d["tgt"][rows].reshape(-1), chunk_size=4).view(-1, T)
    g, _ = grpo_loss(logp, d["logp_old"][rows], d["adv"][rows], d["mask"][rows], num_tokens=num_tokens)
    s, _ = sdl_loss(logp, d["logp_old"][rows], d["logp_teacher"][rows], d["mask"][rows], num_tokens=num_tokens)
    return g + 0.5 * s


def _dist_worker(rank, port, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    d = _dist_data()
    mine = torch.arange(rank * ROWS // 2, (rank + 1) * ROWS // 2)                # a rank's rows
    num_tokens = d["mask"][mine].sum()
    dist.all_reduce(num_tokens)                                                # the global loss-token count
    W = d["W"].clone().requires_grad_()
    for micro in mine.chunk(2):                                                # gradient accumulation
        _dist_loss(d, W, micro, num_tokens).backward()
    dist.all_reduce(W.grad)                                                    # sum, as DDP with a sum-reduce
    if rank == 0:
        torch.save(W.grad, path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_micro_batch_gradients_equal_full_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(port, str(tmp_path / "grad.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "grad.pt")
    d = _dist_data()
    W = d["W"].clone().requires_grad_()
    (want,) = torch.autograd.grad(_dist_loss(d, W, torch.arange(ROWS), None), W)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # The test can fail: normalising each micro-batch by its own count gives a different gradient.
    local = sum(torch.autograd.grad(_dist_loss(d, W, m, None), W)[0] for m in torch.arange(ROWS).chunk(4)) / 4
    assert (local - want).abs().max() > 1e-4


def test_sdl_guard_keeps_the_gradient_direction_far_below_the_teacher():
    """A token the teacher finds e^25 times likelier (l = -25) must be pushed UP (gradient rho * l < 0), with the
    guard bounding its size at rho * 20, not exploding to rho * e^20 with the wrong sign."""
    logp = torch.tensor([[-30.0, -1.0]], dtype=torch.float64, requires_grad=True)
    logp_teacher = torch.tensor([[-5.0, -1.5]], dtype=torch.float64)
    logp_old = torch.tensor([[-30.0, -1.2]], dtype=torch.float64)
    loss, _ = sdl_loss(logp, logp_old, logp_teacher, torch.ones(1, 2, dtype=torch.float64), num_tokens=1)
    loss.backward()
    rho = torch.exp(logp.detach() - logp_old)
    assert torch.isfinite(loss)
    assert torch.allclose(logp.grad[0, 0], rho[0, 0] * -20.0)  # clamped l, right sign
    assert torch.allclose(logp.grad[0, 1], rho[0, 1] * 0.5)  # normal range: exactly rho * l
