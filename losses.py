"""Skill-SD losses: group advantages, token-level GRPO, the importance-weighted reverse-KL self-distillation
loss (SDL), and a fused, chunked log-prob / full-vocabulary reverse-KL / entropy kernel in plain torch.

Legend: P prompts (groups), G samples per group, B episodes (rows), T tokens per row, N flattened tokens,
C hidden size, V vocabulary size. logp = log pi_theta (with grad), logp_old = log pi_old (sampler),
logp_teacher = log pi_T (skill-conditioned teacher). See ../shared/PAPER.md section 3 for the math.

Deliberate simplifications:
- Advantages use the population std of the group (the G samples are the whole group, so adv has unit variance
  within a group); zero-variance groups get adv exactly 0.
- No reference-model KL term and no dual clip in GRPO (the paper's figure has neither); the only guard against
  huge ratios is the exponent clamp logp - logp_old <= MAX_LOG_RATIO, shared with SDL.
- The fused kernels upcast to fp32 (fp64 stays fp64) once per call: the weight is copied to fp32 when it is
  bf16 and grad_weight is accumulated in fp32, so bf16 runs hold two fp32 (V, C) tensors besides the chunk.
- Custom backward passes are first-order only (once_differentiable); no double backward.
- tf32_grads=True runs only the backward's two gradient matmuls on TF32 tensor cores (CUDA; CPU matmuls ignore
  the flag): log-probs, the recomputed softmax and the fp32 accumulation stay exact, gradients carry TF32 rounding.
"""
import contextlib

import torch
from torch.autograd.function import once_differentiable

MAX_NEG_L = 20.0      # guard: exp(-l) uses min(-l, 20); only hit when the teacher is e^20 times more confident
MAX_LOG_RATIO = 10.0  # guard: rho = exp(min(logp - logp_old, 10)); only hit for wildly stale logp_old


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask != 0 (mask values act as weights); 0 where the mask is empty."""
    w = mask.to(x.dtype)
    x = torch.where(mask != 0, x, 0) * w  # where() first: inf/nan at padding must not leak (nan * 0 = nan)
    return x.sum(dim) / w.sum(dim).clamp(min=1e-12)  # dim=None: over all positions


def group_advantages(rewards, eps=1e-6):
    """rewards (P, G) -> (adv (P, G), frac_zero_var). adv = (R - mean) / (std + eps) per group, population std."""
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty (P, G) tensor, got shape {tuple(rewards.shape)}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    mean = rewards.mean(1, keepdim=True)                      # (P, 1)
    std = rewards.std(1, unbiased=False, keepdim=True)        # (P, 1) population std (divide by G, not G - 1)
    zero_var = rewards.amax(1) == rewards.amin(1)             # (P,) exact test: the mean of equal floats may be off by 1 ulp
    adv = torch.where(zero_var[:, None], 0.0, (rewards - mean) / (std + eps))
    return adv, zero_var.float().mean().item()


def _check_like(logp, mask, num_tokens, **others):
    for name, x in dict(mask=mask, **others).items():
        if not torch.is_tensor(x) or x.shape != logp.shape:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} must be a tensor shaped like logp {tuple(logp.shape)}, got {shape}")
    if num_tokens is None:
        return mask.to(logp.dtype).sum().clamp(min=1)  # this batch's loss-token count
    if float(num_tokens) <= 0:
        raise ValueError(f"num_tokens must be > 0 (the global count of loss tokens), got {num_tokens}")
    return num_tokens


def grpo_loss(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.28, num_tokens=None):
    """Token-level GRPO with asymmetric clip. logp, logp_old, mask: (B, T); adv: (B,) per episode or (B, T).
    loss = -(1/num_tokens) sum_t mask * min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = exp(logp - logp_old)."""
    adv = torch.as_tensor(adv, dtype=logp.dtype, device=logp.device)
    if adv.dim() == logp.dim() - 1:
        adv = adv.unsqueeze(-1)                               # (B, 1): every token of an episode carries A_i
    try:
        adv = adv.detach().expand_as(logp)                    # (B, T)
    except RuntimeError:
        raise ValueError(f"adv must be (B,) or (B, T) for logp {tuple(logp.shape)}, got {tuple(adv.shape)}") from None
    N = _check_like(logp, mask, num_tokens, logp_old=logp_old)
    m, w = mask != 0, mask.to(logp.dtype)
    # Zero out padding before any arithmetic, so garbage there (inf, nan) can neither reach the loss nor the grad.
    logp, logp_old, adv = (torch.where(m, x, 0) for x in (logp, logp_old.detach(), adv))
    ratio = (logp - logp_old).clamp(max=MAX_LOG_RATIO).exp()                  # (B, T)
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    loss = -(surr * w).sum() / N
    with torch.no_grad():
        clipped = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))  # grad zeroed here
        r_max = ratio.masked_fill(~m, float("-inf")).max() if m.any() else ratio.new_zeros(())
        clip_frac, ratio_mean, ratio_max = torch.stack(  # one host sync for all metrics
            [masked_mean(clipped.to(w.dtype), w), masked_mean(ratio, w), r_max]).tolist()
    return loss, dict(clip_frac=clip_frac, ratio_mean=ratio_mean, ratio_max=ratio_max)


def sdl_loss(logp, logp_old, logp_teacher, mask, num_tokens=None):
    """Importance-weighted reverse-KL self-distillation: (1/num_tokens) sum_t mask * rho * (exp(-l) - 1 + l),
    l = logp - logp_teacher, rho = exp(logp - logp_old). logp_old and logp_teacher are detached here.
    Per-token gradient: d/dlogp [rho (e^-l - 1 + l)] = rho k3 + rho (1 - e^-l) = rho * l; in expectation over
    y ~ pi_old that is sum_y pi_theta l grad log pi_theta = grad KL(pi_theta || pi_T) (PAPER.md section 3)."""
    N = _check_like(logp, mask, num_tokens, logp_old=logp_old, logp_teacher=logp_teacher)
    m, w = mask != 0, mask.to(logp.dtype)
    logp, logp_old, logp_teacher = (torch.where(m, x, 0) for x in (logp, logp_old.detach(), logp_teacher.detach()))
    l = logp - logp_teacher                                                   # (B, T)
    rho = (logp - logp_old).clamp(max=MAX_LOG_RATIO).exp()                    # (B, T)
    # expm1(-l) + l == e^-l - 1 + l without the cancellation of 1 - 1 for small l.
    k3 = torch.expm1((-l).clamp(max=MAX_NEG_L)) + l                           # (B, T), >= 0
    # Value rho * k3, gradient rho * l, written as value + g * (logp - sg(logp)). Autograd through the clamped
    # exponent would give rho * (k3 + 1 - e^-l) with e^-l frozen at e^20: about +5e8 * rho for l < -20, the
    # wrong sign. The explicit form keeps grad = rho * l exactly in the normal range and clamps l beyond it.
    g = (rho * l.clamp(min=-MAX_NEG_L)).detach()                              # (B, T) d loss_t / d logp_t
    loss = (((rho * k3).detach() + g * (logp - logp.detach())) * w).sum() / N
    with torch.no_grad():
        r_max = rho.masked_fill(~m, float("-inf")).max() if m.any() else rho.new_zeros(())
        l_mean, rho_mean, rho_max, k3_mean = torch.stack(
            [masked_mean(l, w), masked_mean(rho, w), r_max, masked_mean(k3, w)]).tolist()
    return loss, dict(l_mean=l_mean, rho_mean=rho_mean, rho_max=rho_max, k3_mean=k3_mean)


def sdl_full_loss(hs, weight, hs_teacher, teacher_weight, mask, num_tokens=None, chunk_size=1024, tf32_grads=False):
    """Full-vocabulary SDL: (1/num_tokens) sum_n mask_n KL(pi_theta || pi_T)(. | s_n), exact over all V tokens
    at the student's sampled positions s_n, through the fused kernel (no (n, V) tensor). hs (n, C) with grad;
    hs_teacher (n, C) the teacher's hidden states at the same positions (detached here); mask (n,) weights.
    Weighting: none, on purpose. rho = pi_theta(y)/pi_old(y) in sdl_loss corrects the *sampled token* y at s_n;
    summing over every y leaves nothing to correct: E_{y ~ pi_old}[rho k3] = KL and E[rho l grad logp] = grad KL
    at s_n, for any theta (tests/test_losses.py). So this is sdl_loss averaged over the sampled token, same
    expected value and gradient, no sampling noise. A rho of the sampled token here would only add the zero-mean
    term KL grad logp(y). Per position, like sdl_loss: the positions' distribution is not corrected (that needs a
    product of earlier ratios), nor is a token's effect on later KLs counted."""
    _check_kernel(hs, weight, chunk_size, h_teacher=hs_teacher)
    if not torch.is_tensor(mask) or mask.shape != hs.shape[:1]:
        raise ValueError(f"mask must be a tensor of shape ({hs.shape[0]},), one weight per row of hs, got "
                         f"{tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__}")
    m = mask != 0  # rows without a teacher (no skill) cost nothing, and garbage there cannot leak
    kl = reverse_kl_full(hs[m], hs_teacher[m], weight, chunk_size, teacher_weight, tf32_grads)  # (n_distill,)
    w = mask[m].to(kl.dtype)
    N = _check_like(w, w, num_tokens)  # validates num_tokens; default: this batch's (weighted) count
    loss = (kl * w).sum() / N
    return loss, dict(kl_mean=masked_mean(kl.detach(), w).item())


# ----------------------------------------------------------------------------------------------------------
# Fused chunked kernels: never hold an (N, V) tensor; one (chunk_size, V) buffer is reused for every chunk.

@contextlib.contextmanager
def _tf32(on):
    """fp32 CUDA matmuls on TF32 tensor cores inside the block when on (CPU matmuls ignore the flag)."""
    m = torch.backends.cuda.matmul
    key = "fp32_precision" if hasattr(m, "fp32_precision") else "allow_tf32"  # torch >= 2.9 / older
    old = getattr(m, key)
    setattr(m, key, ("tf32" if key == "fp32_precision" else True) if on else old)  # off: unchanged
    try:
        yield
    finally:
        setattr(m, key, old)


def _cdtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32  # compute in fp32, or fp64 for gradcheck


def _check_kernel(hidden, weight, chunk_size, targets=None, h_teacher=None):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden (N, C) and weight (V, C), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if h_teacher is not None and h_teacher.shape != hidden.shape:
        raise ValueError(f"h_teacher {tuple(h_teacher.shape)} must match h_student {tuple(hidden.shape)}")
    if targets is not None:
        if targets.shape != hidden.shape[:1] or targets.dtype != torch.long:
            raise ValueError(f"targets must be a LongTensor of shape ({hidden.shape[0]},), got "
                             f"{targets.dtype} {tuple(targets.shape)}")
        if targets.numel() and (targets.min() < 0 or targets.max() >= weight.shape[0]):
            raise ValueError(f"targets must lie in [0, {weight.shape[0]}); mask padding instead of using -100")


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, tf32_grads):
        cd = _cdtype(hidden.dtype)
        W = weight.to(cd)                                     # (V, C), no copy when already fp32
        N, V = hidden.shape[0], W.shape[0]
        out = torch.empty(N, dtype=cd, device=hidden.device)  # (N,)
        lse = torch.empty(N, dtype=cd, device=hidden.device)  # (N,) saved so backward skips the reduction
        buf = torch.empty(min(chunk_size, N), V, dtype=cd, device=hidden.device)  # (chunk, V)
        for i in range(0, N, chunk_size):
            h, t = hidden[i:i + chunk_size].to(cd), targets[i:i + chunk_size]
            z = torch.mm(h, W.t(), out=buf[:h.shape[0]])      # (n, V) logits
            picked = z.gather(1, t[:, None]).squeeze(1)       # (n,)
            mx = z.amax(1)                                    # logsumexp in place: no extra (n, V) temporary
            lse[i:i + chunk_size] = mx + z.sub_(mx[:, None]).exp_().sum(1).log()
            out[i:i + chunk_size] = picked - lse[i:i + chunk_size]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size, ctx.tf32_grads = chunk_size, tf32_grads
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        cd, cs = lse.dtype, ctx.chunk_size
        W, go = weight.to(cd), grad_out.to(cd)
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty(hidden.shape, dtype=cd, device=hidden.device) if need_h else None  # (N, C)
        grad_w = torch.zeros(W.shape, dtype=cd, device=W.device) if need_w else None           # (V, C)
        buf = torch.empty(min(cs, hidden.shape[0]), W.shape[0], dtype=cd, device=hidden.device)
        for i in range(0, hidden.shape[0], cs):
            h, t, g = hidden[i:i + cs].to(cd), targets[i:i + cs], go[i:i + cs]
            z = torch.mm(h, W.t(), out=buf[:h.shape[0]])      # recompute the chunk's logits (n, V)
            z.sub_(lse[i:i + cs, None]).exp_()                # softmax p
            z.mul_(-g[:, None]).scatter_add_(1, t[:, None], g[:, None])  # dlogp/dlogits * go = go (onehot - p)
            with _tf32(ctx.tf32_grads):
                if need_h:
                    torch.mm(z, W, out=grad_h[i:i + cs])      # (n, C)
                if need_w:
                    grad_w.addmm_(z.t(), h)                   # (V, C) += (V, n) @ (n, C)
        return (grad_h.to(hidden.dtype) if need_h else None,
                grad_w.to(weight.dtype) if need_w else None, None, None, None)


def token_logprobs(hidden, weight, targets, chunk_size=1024, tf32_grads=False):
    """log softmax(hidden @ weight.T)[n, targets[n]] -> (N,) in fp32 (fp64 for fp64 inputs), chunked over rows;
    the backward recomputes each chunk's logits instead of storing them. Grads come back in the input dtypes.
    That recompute makes 4 (N, C, V) matmuls against the naive path's 3: ~1.33x its time where they dominate
    (CUDA fp32). tf32_grads=True runs the two gradient matmuls on TF32 tensor cores (see the module docstring).
    chunk_size=1024: at N=8192, C=1024, V=49k / 152k (fp32, CPU) bench/bench_losses.py measured a peak of 9-10%
    of the naive path at 0.9-1.2x its wall time; peak ~ (chunk_size + C) * V * 4 bytes vs ~3 * N * V * 4 naive."""
    _check_kernel(hidden, weight, chunk_size, targets=targets)
    return _TokenLogprobs.apply(hidden, weight, targets, chunk_size, bool(tf32_grads))


class _ReverseKL(torch.autograd.Function):
    @staticmethod
    def _chunk(hs, ht, W, Wt):
        ls = torch.log_softmax(torch.mm(hs, W.t()), 1)        # (n, V) student log-probs
        diff = torch.log_softmax(torch.mm(ht, Wt.t()), 1).neg_().add_(ls)  # (n, V) log p_s - log p_t
        p = ls.exp_()                                         # (n, V) reuses ls' storage
        return p, diff, (p * diff).sum(1)                     # kl (n,)

    @staticmethod
    def forward(ctx, h_student, h_teacher, weight, weight_teacher, chunk_size, tf32_grads):
        cd = _cdtype(h_student.dtype)
        W, Wt = weight.to(cd), weight_teacher.to(cd)
        kl = torch.empty(h_student.shape[0], dtype=cd, device=h_student.device)
        for i in range(0, h_student.shape[0], chunk_size):
            kl[i:i + chunk_size] = _ReverseKL._chunk(h_student[i:i + chunk_size].to(cd),
                                                     h_teacher[i:i + chunk_size].to(cd), W, Wt)[2]
        ctx.save_for_backward(h_student, h_teacher, weight, weight_teacher, kl)
        ctx.chunk_size, ctx.tf32_grads = chunk_size, tf32_grads
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hs_all, ht_all, weight, weight_teacher, kl = ctx.saved_tensors
        cd, cs = kl.dtype, ctx.chunk_size
        W, Wt, go = weight.to(cd), weight_teacher.to(cd), grad_out.to(cd)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_h = torch.empty(hs_all.shape, dtype=cd, device=hs_all.device) if need_h else None
        grad_w = torch.zeros(W.shape, dtype=cd, device=W.device) if need_w else None
        for i in range(0, hs_all.shape[0], cs):
            hs = hs_all[i:i + cs].to(cd)
            p, diff, _ = _ReverseKL._chunk(hs, ht_all[i:i + cs].to(cd), W, Wt)
            # dKL/dz_s = p_s * (log p_s - log p_t - KL), times the upstream grad of each row
            g = diff.sub_(kl[i:i + cs, None]).mul_(p).mul_(go[i:i + cs, None])  # (n, V)
            with _tf32(ctx.tf32_grads):
                if need_h:
                    torch.mm(g, W, out=grad_h[i:i + cs])
                if need_w:
                    grad_w.addmm_(g.t(), hs)
        return (grad_h.to(hs_all.dtype) if need_h else None, None,
                grad_w.to(weight.dtype) if need_w else None, None, None, None)


def reverse_kl_full(h_student, h_teacher, weight, chunk_size=1024, weight_teacher=None, tf32_grads=False):
    """Exact KL(pi_s || pi_t) over the full vocabulary per row -> (N,), pi_s = softmax(h_student @ weight.T),
    pi_t = softmax(h_teacher @ weight_teacher.T) (default: the same weight). Gradient flows to h_student and
    weight through pi_s only; the teacher side is a detached target (h_teacher, weight_teacher get no grad)."""
    _check_kernel(h_student, weight, chunk_size, h_teacher=h_teacher)
    weight_teacher = weight if weight_teacher is None else weight_teacher
    if weight_teacher.shape != weight.shape:
        raise ValueError(f"weight_teacher {tuple(weight_teacher.shape)} must match weight {tuple(weight.shape)}")
    return _ReverseKL.apply(h_student, h_teacher.detach(), weight, weight_teacher.detach(), chunk_size,
                            bool(tf32_grads))


@torch.no_grad()
def token_entropy(hidden, weight, chunk_size=1024):
    """Entropy of softmax(hidden @ weight.T) per row -> (N,), chunked, no grad (a metric)."""
    _check_kernel(hidden, weight, chunk_size)
    W = weight.to(_cdtype(hidden.dtype))
    ent = torch.empty(hidden.shape[0], dtype=W.dtype, device=hidden.device)
    for i in range(0, hidden.shape[0], chunk_size):
        logp = torch.log_softmax(torch.mm(hidden[i:i + chunk_size].to(W.dtype), W.t()), 1)  # (n, V)
        ent[i:i + chunk_size] = -(logp.exp() * logp).sum(1)
    return ent
