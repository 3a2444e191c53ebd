"""C²R and OrtSAE regularizers against slow, direct computations of their formulas; specs and schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from saelab import regularizers as R
from saelab.kernels import neighbours as NB
from saelab.kernels import screen
from saelab.codes import Code


# -- slow references (python loops over latents, float64) ---------------------------------------------
def _chunks(M: int, chunk_size: int, seed: int | None) -> list[list[int]]:
    """The latent chunks: one chunk in order, or torch.randperm(M) on a generator seeded ``seed``."""
    if chunk_size >= M:
        return [list(range(M))]
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[i : i + chunk_size] for i in range(0, M, chunk_size)]


def _ref_terms(W: torch.Tensor, chunk_size: int, seed: int | None) -> tuple[list[float], list[int]]:
    """Per latent: ``s_j = max(0, cos(d_j, d_nu(j)))^2`` and ``nu(j)``, nearest inside the chunk, first on ties."""
    W = W.detach().cpu()  # the reference runs on the CPU whatever device the tested call used
    M = W.shape[0]
    rows = [W[j].double() / W[j].double().norm() for j in range(M)]
    s, nu = [0.0] * M, list(range(M))
    for chunk in _chunks(M, chunk_size, seed):
        for j in chunk:
            best, arg = -2.0, j
            for k in chunk:
                if k != j and float(rows[j] @ rows[k]) > best:
                    best, arg = float(rows[j] @ rows[k]), k
            s[j], nu[j] = max(0.0, best) ** 2, arg
    return s, nu


def _ref_c2r(Fc: torch.Tensor, W: torch.Tensor, alpha: float, chunk_size: int, seed: int | None = None) -> float:
    Fc = Fc.detach().cpu()
    M = W.shape[0]
    n = [math.sqrt(sum(float(Fc[b, j]) ** 2 for b in range(Fc.shape[0]))) for j in range(M)]
    s, nu = _ref_terms(W, chunk_size, seed)
    return sum(s[j] * (n[j] + n[nu[j]]) ** alpha for j in range(M)) / M


def _ref_ortho(W: torch.Tensor, chunk_size: int, seed: int | None = None) -> float:
    s, _ = _ref_terms(W, chunk_size, seed)
    return sum(s) / len(s)


def nondet_tol(device: torch.device) -> float:
    """``gradcheck``'s tolerance between two backward passes of one input: 0 on the CPU (every per-latent sum adds
    in a fixed order); 1e-12 elsewhere, where ``index_add_`` adds with atomics and the float64 sums may differ in
    their last bits from run to run."""
    return 0.0 if device.type == "cpu" else 1e-12


def _codes(B: int, M: int, dead: tuple[int, ...] = (), dtype=torch.float64) -> torch.Tensor:
    Fc = torch.relu(torch.randn(B, M, dtype=dtype))
    Fc[:, list(dead)] = 0.0
    return Fc


# -- C²R ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_c2r_matches_reference_single_chunk(alpha, device):
    Fc, W = _codes(7, 12, dead=(3,)).to(device), torch.randn(12, 5, dtype=torch.float64).to(device)
    got = R.c2r_loss(Fc, W, alpha=alpha, chunk_size=12)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(_ref_c2r(Fc, W, alpha, 12), rel=1e-10)
    assert float(R.c2r_loss(Fc, W, alpha=alpha)) == pytest.approx(float(got), rel=1e-12)  # default 8192 >= M


@pytest.mark.parametrize("M, chunk", [(40, 16), (17, 16), (2500, 1100)])
def test_c2r_matches_reference_random_chunks(M, chunk, device):
    """Chunks from ``torch.randperm(M, generator)``; (17, 16) leaves a chunk of one latent, which adds 0.

    (2500, 1100): chunks larger than the search's 1024-row blocks."""
    d = 6 if M < 100 else 24
    Fc, W = _codes(5, M, dead=(0, 5)), torch.randn(M, d, dtype=torch.float64)  # the reference's CPU copies
    got = R.c2r_loss(Fc.to(device), W.to(device), chunk_size=chunk, generator=torch.Generator().manual_seed(3))
    if M < 100:
        ref = _ref_c2r(Fc, W, 1.0, chunk, seed=3)
    else:  # vectorised reference for the large case: brute force per chunk, same permutation
        Wn = torch.nn.functional.normalize(W, dim=-1)
        n = Fc.norm(dim=0)
        ref = 0.0
        for c in torch.randperm(M, generator=torch.Generator().manual_seed(3)).split(chunk):
            S = Wn[c] @ Wn[c].T
            S.fill_diagonal_(-2.0)
            v, a = S.max(1)
            ref += float((v.clamp_min(0) ** 2 * (n[c] + n[c][a])).sum())
        ref /= M
    assert float(got) == pytest.approx(ref, rel=1e-10)
    # chunking is really applied: the single-chunk loss differs
    assert abs(float(R.c2r_loss(Fc.to(device), W.to(device), chunk_size=M)) - float(got)) > 1e-6


def test_singleton_chunk_contributes_nothing(device):
    W = torch.randn(3, 4, dtype=torch.float64).to(device)
    Fc = (_codes(4, 3) + 0.1).to(device)
    assert float(R.c2r_loss(Fc, W, chunk_size=2, generator=torch.Generator().manual_seed(0))) == pytest.approx(
        _ref_c2r(Fc, W, 1.0, 2, seed=0), rel=1e-12
    )
    # 3 latents in chunks of 2: exactly one latent is alone and has s = 0 (not cos(d, d)^2 = 1)
    s, nu = R._neighbour_cos_sq(W, 2, torch.Generator().manual_seed(0), "exact")
    alone = nu == torch.arange(3, device=device)
    assert int(alone.sum()) == 1 and float(s[alone]) == 0.0


def test_negative_cosines_are_clamped(device):
    """Three atoms 120 degrees apart: every nearest cosine is -1/2, so both losses are 0 (not 1/4 per latent)."""
    ang = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=torch.float64)
    W = (torch.stack([ang.cos(), ang.sin()], dim=1) * torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)).to(device)
    assert float(R.c2r_loss((_codes(4, 3) + 1.0).to(device), W)) == 0.0
    assert float(R.ortho_loss(W)) == 0.0


def test_decoder_row_scale_is_ignored(device):
    """Rows are normalised inside: scaling them changes nothing."""
    Fc, W = _codes(6, 10).to(device), torch.randn(10, 4, dtype=torch.float64).to(device)
    scale = (torch.rand(10, 1, dtype=torch.float64) * 5 + 0.1).to(device)
    torch.testing.assert_close(R.c2r_loss(Fc, W * scale), R.c2r_loss(Fc, W), rtol=1e-12, atol=0)


def test_sparse_dense_and_norm_forms_agree_with_gradients(device):
    torch.manual_seed(1)
    B, M, k = 9, 30, 4
    pre = torch.randn(B, M, dtype=torch.float64).to(device)
    vals, idx = pre.topk(k, dim=-1)
    vals = vals.relu().requires_grad_()
    W = torch.randn(M, 5, dtype=torch.float64).to(device).requires_grad_()
    dense = torch.zeros(B, M, dtype=torch.float64, device=device).scatter(1, idx, vals.detach()).requires_grad_()
    assert (dense.detach().norm(dim=0) == 0).any()  # some dead latents in the test case
    torch.testing.assert_close(R.column_norms(vals, idx, M), dense.norm(dim=0), rtol=1e-12, atol=0)
    torch.testing.assert_close(R.column_norms(dense, None, M), dense.norm(dim=0), rtol=1e-12, atol=0)

    l_sparse = R.c2r_loss(Code(vals, idx), W)
    g_vals, g_W1 = torch.autograd.grad(l_sparse, [vals, W])
    l_dense = R.c2r_loss(dense, W)
    g_dense, g_W2 = torch.autograd.grad(l_dense, [dense, W])
    l_norms = R.c2r_loss(dense.detach().norm(dim=0), W)
    l_code_dense = R.c2r_loss(Code(dense.detach()), W)  # Code with indices=None counts as dense
    for other in (l_dense, l_norms, l_code_dense):
        torch.testing.assert_close(other, l_sparse, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_W1, g_W2, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g_vals, g_dense.gather(1, idx), rtol=1e-10, atol=1e-14)
    assert g_dense.abs().sum() > 0


def test_bad_code_shapes_are_errors():
    W = torch.randn(10, 4)
    with pytest.raises(ValueError, match="M=10"):
        R.c2r_loss(torch.rand(5, 11), W)
    with pytest.raises(ValueError, match=r"\(M,\)"):
        R.c2r_loss(torch.rand(11), W)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_dead_latents_get_finite_zero_gradients(alpha, device):
    """n_j = 0 has an infinite sqrt derivative; dead latents must get gradient 0, also when a dead latent's
    nearest neighbour is dead too ((0 + 0)^alpha with alpha < 1)."""
    W = torch.randn(8, 4, dtype=torch.float64)
    W[1] = W[0] + 0.01 * torch.randn(4, dtype=torch.float64)  # 0 and 1: mutual nearest neighbours, both dead
    W = W.to(device).requires_grad_()
    Fc = _codes(6, 8, dead=(0, 1, 5)).to(device).requires_grad_()
    loss = R.c2r_loss(Fc, W, alpha=alpha)
    gF, gW = torch.autograd.grad(loss, [Fc, W])
    assert torch.isfinite(loss) and torch.isfinite(gF).all() and torch.isfinite(gW).all()
    assert gF[:, [0, 1, 5]].abs().max() == 0
    assert gF.abs().sum() > 0 and gW.abs().sum() > 0
    # sparse path: TopK codes can hold exact zeros (ReLU'd), here every entry of latent 3 is a 0
    vals = torch.rand(6, 2, dtype=torch.float64)
    vals[:, 1] = 0.0
    vals = vals.to(device).requires_grad_()
    idx = torch.tensor([[2, 3]] * 6, device=device)
    g, gW = torch.autograd.grad(R.c2r_loss((vals, idx), W, alpha=alpha), [vals, W])
    assert torch.isfinite(g).all() and torch.isfinite(gW).all()
    assert g[:, 1].abs().max() == 0 and g[:, 0].abs().sum() > 0


def test_gradcheck_float64(device):
    """Away from argmax switches and zero norms the loss is smooth: autograd matches finite differences."""
    torch.manual_seed(2)
    Fc = (torch.rand(5, 6, dtype=torch.float64) + 0.1).to(device).requires_grad_()
    W = torch.randn(6, 4, dtype=torch.float64).to(device).requires_grad_()
    s, _ = R._neighbour_cos_sq(W.detach(), 8192, None, "exact")
    assert (s > 1e-3).all()  # no nearest cosine near the clamp at 0
    tol = nondet_tol(device)
    assert torch.autograd.gradcheck(lambda f, w: R.c2r_loss(f, w, alpha=1.5), (Fc, W), nondet_tol=tol)
    assert torch.autograd.gradcheck(lambda f, w: R.c2r_loss(f, w), (Fc, W), nondet_tol=tol)
    assert torch.autograd.gradcheck(lambda w: R.ortho_loss(w), (W,), nondet_tol=tol)


# -- OrtSAE ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("M, chunk", [(12, 8192), (40, 16), (17, 16)])
def test_ortho_matches_reference(M, chunk, device):
    W = torch.randn(M, 5, dtype=torch.float64).to(device).requires_grad_()
    got = R.ortho_loss(W, chunk_size=chunk, generator=torch.Generator().manual_seed(4))
    assert float(got.detach()) == pytest.approx(_ref_ortho(W.detach(), chunk, seed=4), rel=1e-10)
    got.backward()
    assert W.grad.abs().sum() > 0


@pytest.mark.parametrize("alpha, chunk", [(1.0, 8192), (0.5, 8192), (1.0, 16)])
def test_c2r_with_equal_column_norms_is_scaled_ortho(alpha, chunk, device):
    """With n_j = c for all j, C²R = (2c)^alpha * OrtSAE (same chunks)."""
    M, c = 40, 1.7
    W = torch.randn(M, 5, dtype=torch.float64).to(device)
    Fc = torch.zeros(4, M, dtype=torch.float64, device=device)
    cols = torch.arange(M, device=device)
    Fc[cols % 4, cols] = c  # one activation of c per column: n_j = c
    c2r = R.c2r_loss(Fc, W, alpha=alpha, chunk_size=chunk, generator=torch.Generator().manual_seed(5))
    ortho = R.ortho_loss(W, chunk_size=chunk, generator=torch.Generator().manual_seed(5))
    assert float(ortho) > 0
    assert float(c2r) == pytest.approx((2 * c) ** alpha * float(ortho), rel=1e-12)


def test_nearest_neighbour_ties_go_to_lowest_index(device):
    W = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], device=device)
    s, nu = R._neighbour_cos_sq(W, 8192, None, "exact")
    assert nu.tolist() == [1, 0, 0, 0]
    assert s.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])


def test_nearest_neighbour_ties_across_search_blocks_go_to_lowest_index(device):
    """Copies of one atom in three different 1024-row search blocks: each copy's neighbour is the lowest-index
    other copy, found both by the row update and by the mirrored column update (saelab argmax on improving
    columns only)."""
    torch.manual_seed(2)
    W = torch.randn(2100, 8, dtype=torch.float64)
    W[1500] = W[5]
    W[2050] = W[5]
    s, nu = R._neighbour_cos_sq(W.to(device), 8192, None, "exact")
    assert (nu[5], nu[1500], nu[2050]) == (1500, 5, 5)
    _, nu_ref = _ref_terms(W, 8192, None)
    assert nu.tolist() == nu_ref


def test_bf16_search_is_close_and_exact_value_for_chosen_pairs(device):
    torch.manual_seed(6)
    W = torch.randn(300, 16).to(device)
    Fc = _codes(8, 300, dtype=torch.float32).to(device)
    exact = R.c2r_loss(Fc, W)
    fast = R.c2r_loss(Fc, W, search="bf16")
    assert fast.dtype == torch.float32
    assert float(fast) == pytest.approx(float(exact), rel=2e-2)
    # whatever pair bf16 picks, its cosine is within bf16 error of the true maximum
    s_exact, _ = R._neighbour_cos_sq(W, 8192, None, "exact")
    s_fast, _ = R._neighbour_cos_sq(W, 8192, None, "bf16")
    assert (s_fast <= s_exact + 1e-6).all() and (s_exact.sqrt() - s_fast.sqrt()).max() < 1e-2


# -- the screened exact search ------------------------------------------------------------------------
def _unit_rows(C: int, d: int, kind: str, seed: int) -> torch.Tensor:
    """fp32 unit rows: ``random`` directions, ``clustered`` (near-duplicates of 16 centres: dense near-ties) or
    ``spiky`` (a few large coordinates per row: the worst relative bf16 rounding)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        W = torch.randn(C, d, generator=g)
    elif kind == "clustered":
        W = torch.randn(16, d, generator=g)[torch.randint(0, 16, (C,), generator=g)] + 0.05 * torch.randn(C, d, generator=g)
    else:
        W = torch.randn(C, d, generator=g) * (torch.rand(C, d, generator=g) < 0.05) * 100 + torch.randn(C, d, generator=g)
    return torch.nn.functional.normalize(W, dim=-1)


@pytest.mark.parametrize("kind", ["random", "clustered", "spiky"])
@pytest.mark.parametrize("C, d", [(300, 576), (700, 96)])
def test_screen_margin_keeps_every_exact_winner(kind, C, d, device):
    """The certified claim of ``screen_margin``, checked against float64: for every row, the bf16 score of the
    exact nearest neighbour is within the margin of the row's best bf16 score; and the margin stays near its
    expected 2-4 u (a loose bound would make the screen useless, not wrong)."""
    D = _unit_rows(C, d, kind, seed=C + d).to(device)
    hi = D.to(torch.bfloat16)
    S_bf = (hi @ hi.T).float()
    S_bf.fill_diagonal_(-2.0)
    S64 = D.double() @ D.double().T
    S64.fill_diagonal_(-2.0)
    top = S_bf.amax(1)
    margin = screen.screen_margin(D, hi, top)
    # every entry whose exact value is within fp32 rounding of the row's best may be the fp32 winner
    may_win = S64 >= S64.amax(1, keepdim=True) - 1e-6
    assert (S_bf >= (top - margin).unsqueeze(1))[may_win].all()
    assert float(margin.max()) < 5 * 2.0**-8  # ~2 u from the inputs, up to 2 u from rounding scores near 1
    # and the margin is not vacuous: some rows hold bf16 scores outside it
    assert ((S_bf < (top - margin).unsqueeze(1)).sum(1) > 0).all()


@pytest.mark.parametrize("kind", ["random", "clustered", "spiky"])
@pytest.mark.parametrize("C", [2, 3, 65, 300, 1100, 2100])
def test_screened_search_equals_fp32_search(kind, C, device):
    """Same neighbours as the fp32 blocked search (sizes below, at and across the 64-column groups and the
    1024-row blocks, with padding); where two candidates are within fp32 rounding of each other either may win,
    but the chosen cosine is then the best one to 1e-6."""
    D = _unit_rows(C, 48, kind, seed=C).to(device)
    got, ref = NB._nearest_in_chunk_screened(D), NB._nearest_in_chunk(D)
    assert (got != torch.arange(C, device=device)).all()
    S64 = D.double() @ D.double().T
    S64.fill_diagonal_(-2.0)
    second = S64.topk(2, dim=1).values if C > 2 else S64.topk(1, dim=1).values.repeat(1, 2) - 1
    clear = (second[:, 0] - second[:, 1]) > 1e-5
    assert (got[clear] == ref[clear]).all()
    rows = torch.arange(C, device=device)
    torch.testing.assert_close(S64[rows, got], S64[rows, ref], rtol=0, atol=1e-6)


def test_screened_search_resolves_ties_below_bf16_resolution(device):
    """Two candidates 1e-5 apart in cosine (bf16 cannot tell them apart): the exact pass picks the right one, in
    either index order, and exact duplicates in different groups and blocks go to the lowest index."""
    torch.manual_seed(4)
    for near, far in [(1500, 700), (700, 1500)]:
        D = torch.nn.functional.normalize(torch.randn(2100, 32), dim=-1)
        e0, e1, e2 = torch.eye(32)[:3]
        D[:, :3] *= 0.01  # keep the rest of the chunk far from the three test rows
        D = torch.nn.functional.normalize(D, dim=-1)
        D[3] = e0
        D[near] = 0.90001 * e0 + math.sqrt(1 - 0.90001**2) * e1
        D[far] = 0.9 * e0 + math.sqrt(1 - 0.9**2) * e2
        D = D.to(device)
        assert int(NB._nearest_in_chunk_screened(D)[3]) == near == int(NB._nearest_in_chunk(D)[3])
    D = torch.nn.functional.normalize(torch.randn(2100, 8), dim=-1)
    D[1500], D[2050] = D[5], D[5]
    nu = NB._nearest_in_chunk_screened(D.to(device))
    assert (int(nu[5]), int(nu[1500]), int(nu[2050])) == (1500, 5, 5)


def test_screened_search_falls_back_on_non_finite_rows(device):
    """A NaN decoder row voids the certificate: the plain search answers, for every row."""
    D = _unit_rows(1500, 16, "random", seed=3)
    D[7] = float("nan")
    D = D.to(device)
    assert NB._nearest_in_chunk_screened(D).tolist() == NB._nearest_in_chunk(D).tolist()


def test_exact_search_is_screened_where_bf16_is_fast(monkeypatch):
    """``search="exact"`` takes the screened path for fp32 chunks above one block where a bf16 GEMM is fast, and
    gives the same loss and gradients as ``search="fp32"``."""
    calls = []
    real = NB._nearest_in_chunk_screened
    monkeypatch.setattr(NB, "_nearest_in_chunk_screened", lambda D: calls.append(D.shape) or real(D))
    monkeypatch.setattr(NB, "bf16_native", lambda device: True)
    torch.manual_seed(8)
    W = torch.randn(2500, 40, requires_grad=True)
    Fc = _codes(6, 2500, dtype=torch.float32)
    losses, grads = [], []
    for search in ("exact", "fp32"):
        loss = R.c2r_loss(Fc, W, chunk_size=1100, generator=torch.Generator().manual_seed(1), search=search)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, W)[0])
    assert calls == [(1100, 40), (1100, 40)]  # the 300-latent last chunk fits one block: the plain search
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="unknown neighbour search 'fp16'; valid: exact, fp32, bf16"):
        R.c2r_loss(Fc, W, search="fp16")


def test_pair_cos_sq_gradients(device):
    """The hand-written backward of ``s_j = max(0, cos(W_j, W_nu(j)))^2`` against autograd through the formula
    (``F.normalize``, gather, product) and ``torch.autograd.gradcheck``; pairs with a negative cosine, a latent paired
    with itself and repeated partners included."""
    torch.manual_seed(12)
    W = torch.randn(9, 5, dtype=torch.float64).to(device).requires_grad_()
    nu = torch.tensor([3, 3, 0, 1, 4, 8, 5, 3, 2], device=device)  # 4 -> itself; 3 is a partner of three latents
    assert torch.autograd.gradcheck(lambda w: NB.PairCosSq.apply(w, nu), (W,), nondet_tol=nondet_tol(device))
    D = torch.nn.functional.normalize(W, dim=-1)
    cos = (D * D[nu]).sum(-1)
    ref = torch.where(nu != torch.arange(9, device=device), cos.clamp_min(0).square(), torch.zeros_like(cos))
    assert (cos < 0).any() and (ref == 0).sum() >= 2
    got = NB.PairCosSq.apply(W, nu)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    w = torch.rand(9, dtype=torch.float64).to(device)
    torch.testing.assert_close(torch.autograd.grad((got * w).sum(), W)[0], torch.autograd.grad((ref * w).sum(), W)[0],
                               rtol=1e-10, atol=1e-12)


def test_chunk_permutation_follows_the_generator(device):
    Fc, W = _codes(5, 40).to(device), torch.randn(40, 6, dtype=torch.float64).to(device)
    a = R.c2r_loss(Fc, W, chunk_size=16, generator=torch.Generator().manual_seed(9))
    b = R.c2r_loss(Fc, W, chunk_size=16, generator=torch.Generator().manual_seed(9))
    c = R.c2r_loss(Fc, W, chunk_size=16, generator=torch.Generator().manual_seed(10))
    assert float(a) == float(b) and float(a) != float(c)
    torch.manual_seed(11)
    d = R.c2r_loss(Fc, W, chunk_size=16)  # generator=None: the global RNG
    torch.manual_seed(11)
    assert float(R.c2r_loss(Fc, W, chunk_size=16)) == float(d)


# -- specs and schedule ---------------------------------------------------------------------------------
def test_spec_defaults():
    c2r = R.parse_regularizer("c2r")
    assert (c2r.name, c2r.coefficient, c2r.every) == ("c2r", 5.0, 5)
    assert c2r.params == {"alpha": 1.0, "chunk": 8192, "search": "exact", "scale": "invariant"} and c2r.needs_codes
    ortho = R.parse_regularizer("ortho")
    assert (ortho.name, ortho.coefficient, ortho.every) == ("ortho", 0.25, 1)
    assert ortho.params == {"chunk": 8192, "search": "exact"} and not ortho.needs_codes


def test_spec_string_and_dict_forms():
    s = R.parse_regularizer(" c2r: lambda=2.5, alpha=0.5 ,every=3,chunk=64,search=bf16")
    assert (s.coefficient, s.every, s.params) == (2.5, 3, {"alpha": 0.5, "chunk": 64, "search": "bf16", "scale": "invariant"})
    assert isinstance(s.every, int) and isinstance(s.params["chunk"], int) and isinstance(s.params["alpha"], float)
    assert R.RegularizerSpec.from_dict({"name": "c2r", "lambda": 5}) == R.parse_regularizer("c2r:lambda=5")
    assert R.RegularizerSpec.from_dict({"name": "ortho", "lambda": 0.1, "every": 2.0}).every == 2
    assert R.parse_regularizer("ortho:lambda=0.25").coefficient == 0.25
    for spec in (s, R.parse_regularizer("ortho:every=4")):
        assert R.parse_regularizer(str(spec)) == spec
        assert R.RegularizerSpec.from_dict(spec.to_dict()) == spec
        assert R.as_regularizer_spec(str(spec)) == R.as_regularizer_spec(spec.to_dict()) == R.as_regularizer_spec(spec) == spec


@pytest.mark.parametrize(
    "text, match",
    [
        ("nope", "unknown regularizer 'nope'; valid regularizers: c2r, ortho"),
        ("c2r:beta=1", "unknown key 'beta'.*valid keys: lambda, every, alpha, chunk, search"),
        ("ortho:alpha=1", "unknown key 'alpha' for regularizer 'ortho'"),
        ("c2r:lambda", "expected key=value"),
        ("c2r:lambda=1,lambda=2", "given twice"),
        ("c2r:every=0", "every=.*>= 1"),
        ("c2r:every=2.5", "integer"),
        ("c2r:chunk=1", ">= 2"),
        ("c2r:lambda=-1", ">= 0"),
        ("c2r:lambda=abc", "not a number"),
        ("c2r:lambda=nan", "finite"),
        ("c2r:search=fp8", "exact, fp32, bf16"),
    ],
)
def test_spec_errors(text, match):
    with pytest.raises(ValueError, match=match):
        R.parse_regularizer(text)


def test_spec_dict_errors():
    with pytest.raises(ValueError, match="needs a 'name'"):
        R.RegularizerSpec.from_dict({"lambda": 5})
    with pytest.raises(ValueError, match="valid keys"):
        R.RegularizerSpec.from_dict({"name": "c2r", "lamda": 5})
    with pytest.raises(ValueError, match="number"):
        R.RegularizerSpec.from_dict({"name": "c2r", "lambda": True})


def test_schedule_off_steps_none_and_on_steps_lambda_times_T(device):
    spec = R.parse_regularizer("c2r:lambda=2,every=3,chunk=16,scale=raw")
    Fc, W = _codes(5, 40).to(device), torch.randn(40, 6, dtype=torch.float64).to(device)
    for step in (1, 2, 4, 5, 7):
        assert spec.compute(step, Fc, W, torch.Generator().manual_seed(0)) is None
    for step in (0, 3, 6, 300):
        got = spec.compute(step, Fc, W, torch.Generator().manual_seed(step))
        raw = R.c2r_loss(Fc, W, chunk_size=16, generator=torch.Generator().manual_seed(step))
        assert torch.equal(got, 2.0 * 3 * raw)
        assert torch.equal(spec.loss(Fc, W, torch.Generator().manual_seed(step)), raw)
    ortho = R.parse_regularizer("ortho:lambda=0.5")
    assert all(ortho.compute(step, None, W) is not None for step in range(3))
    assert torch.equal(ortho.compute(1, None, W), 0.5 * 1 * R.ortho_loss(W))
    with pytest.raises(ValueError, match="needs the batch's codes"):
        spec.compute(0, None, W)


def test_registry_lists_both():
    assert R.REGULARIZERS.names() == ["c2r", "ortho"]
    entry = R.REGULARIZERS.get("c2r")
    assert entry.fn is R.c2r_loss and entry.needs_codes


# -- size-invariant C²R lambda ------------------------------------------------------------------------------
def test_size_factor_is_one_at_the_authors_operating_point_and_follows_the_derivation():
    assert R.c2r_size_factor(65_536, 2048, 60.0) == pytest.approx(1.0, rel=1e-15)
    # alpha = 1: factor = sqrt(M L0 / B) / sqrt(65536 * 60 / 2048)
    assert R.c2r_size_factor(2304, 2048, 32.0) == pytest.approx(math.sqrt(2304 * 32 / 2048) / math.sqrt(1920), rel=1e-12)
    # alpha = 2: the per-entry gradient ratio is B / M, independent of L0
    assert R.c2r_size_factor(1024, 4096, 7.0, alpha=2.0) == pytest.approx((2048 / 65_536) / (4096 / 1024), rel=1e-12)
    with pytest.raises(ValueError, match="l0 > 0"):
        R.c2r_size_factor(1024, 2048, 0.0)


def _planted_pairs(M: int, d: int, cos: float, gen: torch.Generator) -> torch.Tensor:
    """(M, d) unit rows in pairs with cosine ``cos`` (random pairs are much less similar at d = 256)."""
    u = F.normalize(torch.randn(M // 2, d, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(M // 2, d, generator=gen, dtype=torch.float64)
    v = F.normalize(v - (v * u).sum(-1, keepdim=True) * u, dim=-1)
    W = torch.stack([u, cos * u + math.sqrt(1 - cos**2) * v], dim=1).reshape(M, d)
    return W


def _gradient_ratio(M: int, k: int, B: int, scale: str, gen: torch.Generator, d: int = 256, device="cpu") -> float:
    """||dC2R/dF|| / ||dMSE/dF|| over the active code entries of a random TopK code with a fixed residual size
    (drawn on the CPU generator ``gen``, computed on ``device``)."""
    W = _planted_pairs(M, d, 0.9, gen).to(device)
    idx = torch.stack([torch.randperm(M, generator=gen)[:k] for _ in range(B)]).to(device)
    vals = (torch.rand(B, k, generator=gen, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    (g_c2r,) = torch.autograd.grad(R.c2r_loss((vals, idx), W, scale=scale), vals)
    e = (F.normalize(torch.randn(B, d, generator=gen, dtype=torch.float64), dim=-1) * 0.5).to(device)  # x - x_hat
    x_hat = (vals.unsqueeze(-1) * W[idx]).sum(1)
    (g_mse,) = torch.autograd.grad((e.detach() + x_hat.detach() - x_hat).pow(2).sum(-1).mean(), vals)
    return float(g_c2r.norm() / g_mse.norm())


def test_invariant_scaling_keeps_the_c2r_to_mse_gradient_ratio_across_sizes(device):
    """The ratio of the C²R to the reconstruction gradient on the codes stays in a narrow band across d_sae x k x B
    with scale=invariant, and spreads with the authors' raw scaling (the reason lambda = 5 is not portable)."""
    gen = torch.Generator().manual_seed(0)
    grid = [(M, k, B) for M in (512, 2048, 8192) for k in (16, 64) for B in (1024, 4096) if B * k >= 8 * M]
    assert len(grid) >= 8
    inv = [_gradient_ratio(M, k, B, "invariant", gen, device=device) for M, k, B in grid]
    raw = [_gradient_ratio(M, k, B, "raw", gen, device=device) for M, k, B in grid]
    assert max(inv) / min(inv) < 1.15, dict(zip(grid, inv))
    assert max(raw) / min(raw) > 4.0, dict(zip(grid, raw))


def test_invariant_scale_is_the_raw_loss_times_the_factor_and_the_spec_default(device):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(40, 8, generator=gen, dtype=torch.float64).to(device)
    Fc = torch.relu(torch.randn(30, 40, generator=gen, dtype=torch.float64) - 1.0).to(device)
    l0 = float((Fc > 0).sum()) / 30
    raw = R.c2r_loss(Fc, W)
    torch.testing.assert_close(R.c2r_loss(Fc, W, scale="invariant"), raw * R.c2r_size_factor(40, 30, l0), rtol=1e-12, atol=0)
    # precomputed column norms carry no batch size or L0: they must be given
    with pytest.raises(ValueError, match="batch_size= and l0="):
        R.c2r_loss(Fc.norm(dim=0), W, scale="invariant")
    torch.testing.assert_close(R.c2r_loss(Fc.norm(dim=0), W, scale="invariant", batch_size=30, l0=l0),
                               R.c2r_loss(Fc, W, scale="invariant"), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="unknown C²R scale"):
        R.c2r_loss(Fc, W, scale="paper")
    spec = R.parse_regularizer("c2r:lambda=5")
    assert spec.params["scale"] == "invariant" and str(spec).endswith("scale=invariant")
    assert R.parse_regularizer("c2r:scale=raw").params["scale"] == "raw"
    with pytest.raises(ValueError, match="valid values: invariant, raw"):
        R.parse_regularizer("c2r:scale=big")
    torch.testing.assert_close(spec.loss(Fc, W), R.c2r_loss(Fc, W, scale="invariant"), rtol=1e-12, atol=0)
