"""The sparse training path (saelab.kernels) against the dense autograd reference (``dense_reference()``):
values and gradients of every parameter, for every encoder x {topk, batchtopk, matryoshka_batchtopk} with AuxK
(dead latents present) and C²R, several full Adam steps, and the pieces on their own (pair-dot backward,
score/dot inversion, BatchTopK pair selection and padding, grouped sparse decode, sparse AuxK).

Float64 throughout the parity tests, so that the selections (made on pre-activations that agree to ~1e-15)
are identical and only rounding separates the two results."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from saelab.sae import losses
from saelab.sae.objective import LossWeights
from saelab.regularizers import parse_regularizer
from saelab.codes import Code, FlatCode, SparseCode, flat_pairs
from saelab.sae.config import SAEConfig
from saelab.sae.encoders import ENCODERS
from saelab.sae.model import SAE
from saelab.kernels import pairs as sparse
from saelab.kernels.mode import dense_reference
from saelab.kernels.pairs import _PairDots, _SparseDecode
from saelab.kernels.sparse_step import SparseScores, uses_sparse_path

D_IN, D_SAE, K = 8, 40, 3
SELECTING = ["topk", "batchtopk", "matryoshka_batchtopk"]
FRACTIONS = [0.25, 0.25, 0.5]


def make(encoder: str, activation: str, seed: int = 0, dtype=torch.float64, device="cpu") -> SAE:
    """A random SAE with non-trivial biases, non-unit encoder columns and random encoder parameters, drawn on the
    CPU (the same numbers on every device) and moved to ``device``."""
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, activation=activation, encoder=encoder, n_groups=3,
                        matryoshka_fractions=FRACTIONS)).to(dtype).train()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
        sae.W_enc.mul_(torch.empty(1, D_SAE, dtype=dtype).uniform_(0.5, 2.0))
        for name, p in sae.encoder.named_parameters():
            p.normal_(0, 0.3)
            if name == "b":
                p.add_(math.log(math.sqrt(D_IN)))
    return sae.to(device)


def dead_mask(device="cpu") -> torch.Tensor:
    dead = torch.zeros(D_SAE, dtype=torch.bool, device=device)
    dead[::3] = True  # 14 dead latents, more than k_aux below: AuxK must choose among them
    return dead


def step_loss(sae: SAE, x: torch.Tensor, step: int, k_aux: int = 4, c2r: bool = True):
    """The trainer's loss: the SAE's own loss (reconstruction, nested for Matryoshka; AuxK on dead latents, weight
    1/4) plus C²R every 2 steps."""
    if getattr(sae.activation, "group_sizes", None) is not None and sae.encoder.restores_norm:
        pytest.skip("Matryoshka prefixes need a linear decoder: the trainer refuses this combination")
    out = sae.loss(x, dead=dead_mask(x.device), weights=LossWeights(aux_k=k_aux, aux_coefficient=0.25))
    loss = out.loss
    if c2r:
        spec = parse_regularizer("c2r:lambda=0.3,every=2,chunk=16")
        term = spec.compute(step, out.code, sae.W_dec, torch.Generator().manual_seed(step))
        loss = loss + (term if term is not None else 0)
    return loss, out.parts["auxk"], out.code, out.pre, out.x_hat


def one_step(sae: SAE, x: torch.Tensor):
    """One backward of :func:`step_loss` at step 0 from zeroed gradients: ``(loss, aux, code, pre, x_hat, grads)``."""
    sae.zero_grad(set_to_none=True)
    loss, aux, code, pre, x_hat = step_loss(sae, x, step=0)
    loss.backward()
    return float(loss.detach()), float(aux.detach()), code, pre, x_hat.detach(), grads(sae)


def run_both(sae: SAE, fn):
    """``fn()`` on the sparse path and inside ``dense_reference()``; returns both results."""
    out = []
    for ctx in (contextlib.nullcontext(), dense_reference()):
        with ctx:
            out.append(fn())
    return out


def nondet_tol(device: torch.device) -> float:
    """``gradcheck``'s tolerance between two backward passes of one input: 0 on the CPU (every per-latent sum adds
    in a fixed order); 1e-12 elsewhere, where ``index_add_`` and ``embedding_bag``'s backward add with atomics and
    the float64 sums may differ in their last bits from run to run."""
    return 0.0 if device.type == "cpu" else 1e-12


def grads(sae: SAE) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in sae.named_parameters()}


# -- parity: one step -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", SELECTING)
@pytest.mark.parametrize("encoder", ENCODERS.names())
def test_sparse_values_and_gradients_equal_dense_reference(encoder, activation, device):
    sae = make(encoder, activation, device=device)
    x = (torch.randn(24, D_IN, dtype=torch.float64) * 2).to(device)
    sparse, dense = run_both(sae, lambda: one_step(sae, x))
    assert uses_sparse_path(sae)
    assert sparse[2].indices is not None  # the sparse path returns sparse codes ...
    if activation != "topk":
        assert dense[2].indices is None  # ... the dense reference BatchTopK dense ones
    assert isinstance(sparse[3], SparseScores) and not sparse[3].requires_grad
    assert dense[3].requires_grad
    assert sparse[1] > 0  # AuxK is active (dead latents fired among the top pre-activations)
    assert sparse[0] == pytest.approx(dense[0], rel=1e-12)
    assert sparse[1] == pytest.approx(dense[1], rel=1e-12)
    torch.testing.assert_close(sparse[2].dense(D_SAE).detach(), dense[2].dense(D_SAE).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse[3].as_subclass(torch.Tensor), dense[3].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse[4], dense[4], rtol=1e-12, atol=1e-12)
    gs, gd = sparse[5], dense[5]
    assert gs.keys() == gd.keys()
    for name in gs:
        assert (gs[name] is None) == (gd[name] is None), name
        if gs[name] is not None:
            assert gd[name].abs().max() > 0 or name == "b_enc", name
            torch.testing.assert_close(gs[name], gd[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("encoder", ["linear", "cosine_per_feature", "magnitude_bypass"])
def test_gradient_reaches_the_input_when_it_requires_grad(encoder, device):
    sae = make(encoder, "batchtopk", device=device)
    x0 = torch.randn(16, D_IN, dtype=torch.float64).to(device)

    def one():
        x = x0.clone().requires_grad_()
        code, _ = sae.encode_code(x)
        sae.decode_code(code).pow(2).sum().backward()
        return x.grad

    g_sparse, g_dense = run_both(sae, one)
    assert g_dense.abs().max() > 0
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-10, atol=1e-12)


# -- parity: full training steps ----------------------------------------------------------------------------------
@pytest.mark.parametrize("activation,encoder", [("topk", "linear"), ("batchtopk", "cosine_base_delta"),
                                                ("matryoshka_batchtopk", "linear"), ("topk", "magnitude_bypass")])
def test_adam_steps_give_the_same_weights(activation, encoder, device):
    """Six steps of the trainer's update (AuxK, C²R every 2 steps, parallel-gradient removal, clipping, Adam,
    decoder renormalisation) from the same start land on the same weights on both paths."""
    x_all = (torch.randn(6, 32, D_IN, dtype=torch.float64) * 2).to(device)
    finals = []
    for ctx in (contextlib.nullcontext, dense_reference):
        sae = make(encoder, activation, device=device)
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        with ctx():
            for step, x in enumerate(x_all):
                loss = step_loss(sae, x, step)[0]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                sae.remove_parallel_decoder_grad_()
                torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
                opt.step()
                sae.normalize_decoder_()
        finals.append({n: p.detach().clone() for n, p in sae.named_parameters()})
    start = make(encoder, activation, device=device)
    for name, p in start.named_parameters():
        if name != "b_enc" or encoder != "magnitude_bypass":  # b_enc is unused by magnitude_bypass
            assert (finals[0][name] - p.detach()).abs().max() > 1e-4, name  # training moved it
        torch.testing.assert_close(finals[0][name], finals[1][name], rtol=1e-9, atol=1e-11, msg=name)


# -- the pieces ---------------------------------------------------------------------------------------------------
def test_pair_dots_backward_matches_autograd_of_the_gathered_product(device):
    """_PairDots' sparse backward (embedding_bag over x_c for W_enc, W_enc @ colsum for b_dec, a gather for x)
    equals autograd of ``((x - b_dec)[rows] * W_enc.T[cols]).sum(-1)``; including latents no pair uses and a
    token with no pair."""
    torch.manual_seed(3)
    x = torch.randn(7, 5, dtype=torch.float64).to(device).requires_grad_()
    b_dec = torch.randn(5, dtype=torch.float64).to(device).requires_grad_()
    W = torch.randn(5, 11, dtype=torch.float64).to(device).requires_grad_()
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 4, 5, 6, 6], device=device)  # token 3 has no pair
    cols = torch.tensor([3, 7, 3, 0, 1, 9, 3, 10, 2, 7], device=device)  # latents 4, 5, 6, 8 unused
    counts = torch.bincount(rows, minlength=7)
    offsets = counts.cumsum(0) - counts
    ref = ((x - b_dec)[rows] * W.T[cols]).sum(-1)
    got = _PairDots.apply(x, b_dec, W, (x - b_dec).detach(), ref.detach(), rows, cols, offsets)
    torch.testing.assert_close(got, ref.detach())
    g = torch.randn(10, dtype=torch.float64).to(device)
    for a, b in zip(torch.autograd.grad(got, (x, b_dec, W), g), torch.autograd.grad(ref, (x, b_dec, W), g)):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    def pair_dots(x_, b_, W_):
        x_c = (x_ - b_).detach()
        return _PairDots.apply(x_, b_, W_, x_c, (x_c[rows] * W_.T.detach()[cols]).sum(-1), rows, cols, offsets)

    assert torch.autograd.gradcheck(pair_dots, (x, b_dec, W), nondet_tol=nondet_tol(device))


@pytest.mark.parametrize("layout", ["padded", "csr"])
def test_sparse_decode_backward_matches_embedding_bag(layout, device):
    """_SparseDecode (latent-sorted embedding_bag for grad W_dec, the built-in kernel for grad values) against
    the built-in F.embedding_bag, with repeated latents, unused latents and (CSR) an empty bag."""
    torch.manual_seed(4)
    W = torch.randn(9, 5, dtype=torch.float64).to(device).requires_grad_()
    if layout == "padded":
        idx, off = torch.tensor([[1, 4, 4], [0, 8, 1], [4, 2, 7]], device=device), None
        vals = torch.randn(3, 3, dtype=torch.float64).to(device).requires_grad_()
    else:
        idx = torch.tensor([1, 4, 4, 8, 1, 2, 7], device=device)
        off = torch.tensor([0, 3, 3, 5], device=device)  # bag 1 is empty
        vals = torch.randn(7, dtype=torch.float64).to(device).requires_grad_()
    got = _SparseDecode.apply(W, vals, idx, off)
    ref = torch.nn.functional.embedding_bag(idx, W, off, per_sample_weights=vals, mode="sum")
    torch.testing.assert_close(got, ref)
    g = torch.randn(ref.shape, dtype=ref.dtype).to(device)
    for a, b in zip(torch.autograd.grad(got, (W, vals), g), torch.autograd.grad(ref, (W, vals), g)):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda W_, v_: _SparseDecode.apply(W_, v_, idx, off), (W, vals),
                                    nondet_tol=nondet_tol(device))


@pytest.mark.parametrize("encoder", ENCODERS.names())
def test_score_from_dots_is_the_encoder_and_dots_from_scores_inverts_it(encoder, device):
    sae = make(encoder, "topk", device=device)
    enc = sae.encoder
    x_c = (torch.randn(9, D_IN, dtype=torch.float64) * 3).to(device)
    dots = x_c @ sae.W_enc
    xn = x_c.norm(dim=-1, keepdim=True).clamp_min(1e-8) if enc.uses_norms else None
    wn = sae.W_enc.norm(dim=0).clamp_min(1e-12) if enc.uses_norms else None
    with torch.no_grad():
        dense = enc.score_from_dots(dots, xn, wn, sae.b_enc, None)
        torch.testing.assert_close(dense, enc(x_c, sae.W_enc, sae.b_enc), rtol=1e-12, atol=1e-12)
        rows = torch.arange(9, device=device).repeat_interleave(D_SAE)
        cols = torch.arange(D_SAE, device=device).repeat(9)
        xp, wp = (None, None) if xn is None else (xn.squeeze(1)[rows], wn[cols])
        pairs = enc.score_from_dots(dots.flatten(), xp, wp, sae.b_enc, cols)
        torch.testing.assert_close(pairs, dense.flatten(), rtol=1e-12, atol=1e-12)
        back = enc.dots_from_scores(pairs, xp, wp, sae.b_enc, cols)
    kept = dense.flatten() > 0 if encoder == "magnitude_bypass" else torch.ones_like(back, dtype=torch.bool)
    assert kept.sum() > 10
    torch.testing.assert_close(back[kept], dots.flatten()[kept], rtol=1e-10, atol=1e-10)
    if encoder == "magnitude_bypass":  # clipped scores map to the clip point (ReLU gradient 0 there)
        assert (back[~kept] == 0).all()


def test_batchtopk_pairs_are_the_dense_selection_in_csr_order(device):
    sae = make("linear", "batchtopk", device=device)
    pre = torch.randn(30, D_SAE, dtype=torch.float64)
    pre[4] = -5.0  # a token that keeps nothing
    pre[7, :20] += 6.0  # a token that keeps many
    pre = pre.to(device)
    flat = sae.activation.select_pairs(pre)
    assert flat.width is None and flat.values.shape == (K * 30,)
    assert (flat.rows[1:] >= flat.rows[:-1]).all()
    torch.testing.assert_close(flat.values, pre[flat.rows, flat.indices])
    counts = torch.bincount(flat.rows, minlength=30)
    assert counts[4] == 0 and counts[7] >= 20
    torch.testing.assert_close(flat.offsets, counts.cumsum(0) - counts)
    code = flat._replace(values=flat.values.relu()).to_code()
    assert isinstance(code, SparseCode) and code.flat is not None
    assert code.values.shape == (30, int(counts.max()))
    torch.testing.assert_close(code.dense(D_SAE), sae.activation(pre).values)
    torch.testing.assert_close(code.l0(), (sae.activation(pre).values > 0).sum(-1))
    torch.testing.assert_close(code.active_mask_counts(D_SAE), sae.activation(pre).active_mask_counts(D_SAE))


def test_padded_code_dense_keeps_a_real_latent_zero_next_to_padding(device):
    """Padding sits at latent 0 with value 0: ``dense()`` adds, so a token's real latent-0 value survives."""
    values, latents = torch.tensor([2.0, 1.0, 3.0], device=device), torch.tensor([5, 0, 2], device=device)
    flat = FlatCode(values, latents, rows=torch.tensor([0, 1, 1], device=device),
                    offsets=torch.tensor([0, 1], device=device))
    code = flat.to_code()
    assert code.indices.tolist() == [[5, 0], [0, 2]] and code.values.tolist() == [[2.0, 0.0], [1.0, 3.0]]
    dense = code.dense(6)
    assert dense.tolist() == [[0, 0, 0, 0, 0, 2.0], [1.0, 0, 3.0, 0, 0, 0]]
    assert flat_pairs(code) is flat
    assert flat_pairs(Code(code.values, code.indices)).values.shape == (4,)  # padded form: every entry


def test_grouped_sparse_decode_equals_dense_matryoshka(device):
    torch.manual_seed(5)
    sizes = [3, 5, 12]
    f64 = {"dtype": torch.float64}
    x, W, b = (t.to(device) for t in (torch.randn(10, 6, **f64), torch.randn(20, 6, **f64), torch.randn(6, **f64)))
    vals = torch.rand(10, 4, dtype=torch.float64).to(device).requires_grad_()
    idx = torch.stack([torch.randperm(20)[:4] for _ in range(10)])
    idx[2] = torch.tensor([0, 1, 2, 19])  # groups 0 and 2 only
    idx = idx.to(device)
    code = Code(vals, idx)
    got = losses.matryoshka_reconstruction(x, code, W, b, sizes, group_weights=[0.2, 0.3, 0.5])
    ref = losses.matryoshka_reconstruction(x, code.dense(20), W, b, sizes, group_weights=[0.2, 0.3, 0.5])
    torch.testing.assert_close(got.prefix_losses, ref.prefix_losses)
    torch.testing.assert_close(got.x_hat, ref.x_hat)
    g1, g2 = torch.autograd.grad(got.loss, vals), torch.autograd.grad(ref.loss, vals)
    torch.testing.assert_close(g1, g2)
    with pytest.raises(ValueError, match="pass the Code itself"):
        losses.matryoshka_reconstruction(x, vals, W, b, sizes)


@pytest.mark.parametrize("with_x_hat", [False, True])
def test_fused_matryoshka_prefixes_match_autograd(with_x_hat, device):
    """The fused prefix losses (hand-written backward) against the same chain through autograd
    (``dense_reference()``) for every input, an empty group and a token with no pairs included, and gradcheck."""
    torch.manual_seed(6)
    sizes = [3, 5, 12]
    f64 = {"dtype": torch.float64}
    x, W, b, vals = (t.to(device).requires_grad_() for t in (torch.randn(10, 6, **f64), torch.randn(20, 6, **f64),
                                                            torch.randn(6, **f64), torch.rand(10, 4, **f64)))
    idx = torch.stack([torch.randperm(17)[:4] + 3 for _ in range(10)])  # group 0 (latents 0-2) never used
    idx[2] = torch.tensor([3, 4, 5, 19])
    idx = idx.to(device)
    pad = vals.detach().clone()
    pad[4] = 0.0  # token 4: all-zero values still decode (to 0)
    mix = torch.randn(10, 6, dtype=torch.float64).to(device)
    group_weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64, device=device)

    def run():
        L, x_hat = sparse.matryoshka_prefix_losses(x, b, W, flat_pairs(Code(vals * (pad != 0), idx)), sizes)
        out = (L * group_weights).sum()
        return out + (x_hat * mix).sum() if with_x_hat else out, L, x_hat

    got = run()
    g_got = torch.autograd.grad(got[0], [x, b, W, vals])
    with dense_reference():
        ref = run()
        g_ref = torch.autograd.grad(ref[0], [x, b, W, vals])
    torch.testing.assert_close(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2])
    for a, r in zip(g_got, g_ref):
        torch.testing.assert_close(a, r)
    pairs = flat_pairs(Code(vals.detach()[:, :2].clone().requires_grad_(), idx[:, :2]))
    assert torch.autograd.gradcheck(
        lambda xx, bb, WW: sparse.matryoshka_prefix_losses(xx, bb, WW, pairs, sizes)[0], (x, b, W),
        nondet_tol=nondet_tol(device))


@pytest.mark.parametrize("n_dead,k_aux", [(0, 4), (2, 4), (14, 4), (14, 13), (40, 4), (14, 1)])
def test_sparse_auxk_equals_dense_for_few_and_many_dead_latents(n_dead, k_aux, device):
    """2 dead latents, k_aux 4: every dead latent is used (dead-column block); 14 dead: the top k_aux (block),
    which drops scores only in the rows with more than k_aux positive ones (k_aux 4: some rows, not all; 13:
    none, ReLU alone does it); 40 dead or k_aux 1: more than AUXK_BLOCK_FACTOR * k_aux dead, the
    gathered-pairs form."""
    sae = make("cosine_global", "topk", device=device)
    x = torch.randn(20, D_IN, dtype=torch.float64).to(device)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE)[:n_dead]] = True
    dead = dead.to(device)
    residual = torch.randn(20, D_IN, dtype=torch.float64).to(device)
    if (n_dead, k_aux) in ((14, 4), (14, 13)):  # the case's premise: how many rows the top-k changes
        with dense_reference(), torch.no_grad():
            over = int(((sae.encode_code(x)[1][:, dead] > 0).sum(1) > k_aux).sum())
        assert (0 < over < 20) if k_aux == 4 else over == 0, over

    def one():
        sae.zero_grad(set_to_none=True)
        _, pre = sae.encode_code(x)
        aux = losses.auxk_loss(residual, pre, dead, sae.W_dec, k_aux)
        if n_dead:
            aux.backward()
        return float(aux.detach()), grads(sae)

    (a_s, g_s), (a_d, g_d) = run_both(sae, one)
    assert a_s == pytest.approx(a_d, rel=1e-12)
    assert (a_s > 0) == (n_dead > 0)
    for name in g_s:
        assert (g_s[name] is None) == (g_d[name] is None)
        if g_s[name] is not None:
            torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-9, atol=1e-12)


def test_sparse_scores_is_a_plain_detached_tensor_outside_auxk(device):
    sae = make("linear", "topk", dtype=torch.float32, device=device)
    x = torch.randn(5, D_IN).to(device)
    code, pre = sae.encode_code(x)
    assert isinstance(pre, SparseScores) and not pre.requires_grad
    assert type(pre.relu()) is torch.Tensor and type(pre + 1) is torch.Tensor
    torch.testing.assert_close(pre.as_subclass(torch.Tensor), sae.pre_acts(x).detach())
    with torch.no_grad():  # no autograd: plain pre-activations, same code
        code_ng, pre_ng = sae.encode_code(x)
    assert type(pre_ng) is torch.Tensor
    torch.testing.assert_close(code_ng.dense(D_SAE), code.dense(D_SAE).detach())


def test_batchtopk_eval_with_threshold_uses_the_dense_rule(device):
    sae = make("linear", "batchtopk", dtype=torch.float32, device=device).eval()
    assert uses_sparse_path(sae)  # no threshold yet: still batch-level selection
    sae.activation.threshold.fill_(0.3)
    assert not uses_sparse_path(sae)
    x = torch.randn(12, D_IN).to(device)
    code, pre = sae.encode_code(x)
    assert code.indices is None
    torch.testing.assert_close(code.values, pre.relu() * (pre.relu() > 0.3))


@pytest.mark.parametrize("case", ["random", "skewed", "few_positive"])
def test_batchtopk_candidate_selection_is_the_exact_batch_top_kn(case, device):
    """select_pairs searches per-token candidates (2k, then 4x more for tokens that may hold more); the kept
    set must be the batch's top kN of ReLU(pre) whatever the distribution over tokens."""
    torch.manual_seed(11)
    sae = SAE(SAEConfig(d_in=4, d_sae=300, k=5, activation="batchtopk")).to(device).train()
    pre = torch.randn(64, 300, dtype=torch.float64)
    if case == "skewed":  # a few tokens hold most of the batch's top values: several refinement rounds
        pre[:3] += 4.0
        pre[5, :250] += 8.0
    elif case == "few_positive":  # fewer than kN positive entries: all of them, the rest code 0
        pre = pre - 3.2
    pre = pre.to(device)
    flat = sae.activation.select_pairs(pre)
    assert flat.values.shape == (5 * 64,)
    got = flat._replace(values=flat.values.relu()).to_code().dense(300)
    want = sae.activation(pre).values
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    counts = torch.bincount(flat.rows, minlength=64)
    if case == "skewed":
        assert counts[5] == 250 and counts[:3].min() > 2 * 5  # beyond the first 2k candidates
    if case == "few_positive":
        assert 0 < int((want > 0).sum()) < 5 * 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("encoder", ENCODERS.names())
def test_scores_into_matches_the_encoder_forward(encoder, dtype, device):
    """The kernels' scores from the encoder's operands equal its autograd forward."""
    from saelab.kernels.scores import scores_into

    sae = make(encoder, "topk", dtype=dtype, device=device)
    x_c = (torch.randn(130, D_IN, dtype=dtype) * 3).to(device)  # > 64 rows: several epilogue blocks
    out = torch.full((130, D_SAE), float("nan"), dtype=dtype, device=device)
    got = scores_into(sae.encoder.score_operands(x_c, sae.W_enc, sae.b_enc), out)
    assert got is out
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, sae.encoder(x_c, sae.W_enc, sae.b_enc).detach(), rtol=tol, atol=tol)


def test_reused_scores_buffer_never_overwrites_a_held_pre():
    sae = make("linear", "topk", dtype=torch.float32)
    x1, x2 = torch.randn(6, D_IN), torch.randn(6, D_IN)
    _, pre1 = sae.encode_code(x1)
    kept = pre1.clone()
    _, pre2 = sae.encode_code(x2)  # pre1 is still referenced: a new buffer
    torch.testing.assert_close(pre1, kept)
    assert pre1.data_ptr() != pre2.data_ptr()
    del pre1
    _, pre3 = sae.encode_code(x1)  # the first buffer is free again... or the second: either way no aliasing
    assert pre3.data_ptr() != pre2.data_ptr()
    torch.testing.assert_close(pre3.as_subclass(torch.Tensor), kept)
    ptr = sae.__dict__["_sparse_buffers"]["scores"].data_ptr()
    del pre2, pre3
    _, pre4 = sae.encode_code(x2)
    assert pre4.data_ptr() == ptr  # the kept buffer is reused once nothing else holds its storage
    _, pre5 = sae.encode_code(x1)  # pre4 is held: a new buffer again
    assert pre5.data_ptr() != ptr


def test_screened_step_reuses_its_buffers_across_steps():
    """The screened selection's operands and bf16 scores live in buffers kept on the SAE: step 2 writes into the
    same storage as step 1 (a fresh 75-150 MB tensor per step costs page faults)."""
    from saelab.kernels.sparse_step import set_selection_gemm

    sae = make("linear", "topk", dtype=torch.float32)
    set_selection_gemm(sae, "bf16")
    x = torch.randn(40, D_IN)
    one_step(sae, x)
    bufs = dict(sae.__dict__["_sparse_buffers"])
    assert {"screen_L", "screen_R", "screen_scores"} <= set(bufs)
    one_step(sae, x)
    assert {k: v.data_ptr() for k, v in sae.__dict__["_sparse_buffers"].items()} == {k: v.data_ptr() for k, v in bufs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,d", [(1, 4096), (8, 4096), (32, 4096), (64, 4096), (100, 4096), (288, 4598), (32, 4103),
                                 (64, 9216), (32, 9221)])
def test_row_topk_equals_topk(m, d, dtype, device):
    """The two-stage grouped top-k keeps the same values as ``topk`` (indices up to ties), on wide rows with ties,
    -inf and constant rows, also when the width is not a multiple of the group size (the remainder columns, and
    the row maxima placed there, must be found); values stay differentiable. At d ~9216 the group maxima are wide
    enough that their own top-k is two-stage again (checked there: ``row_topk`` recurses)."""
    import saelab.kernels.topk as A
    from saelab.kernels.topk import row_topk

    calls = []
    real = A.row_topk

    def counting(x, m):
        calls.append(x.shape[-1])
        return real(x, m)

    A.row_topk = counting  # the recursive call resolves the module global
    try:
        real(torch.randn(2, d).to(device), m)
    finally:
        A.row_topk = real
    if device.type == "cpu":  # the two-stage split is the CPU's cache strategy; another device may pick its own
        assert calls or d < 9000, calls

    torch.manual_seed(m)
    x = torch.randn(50, d).to(dtype)
    x[0] = 1.0  # a constant row: every entry tied
    x[1, ::3] = float("-inf")
    x[2] = torch.randint(0, 5, (d,)).to(dtype)  # heavy ties
    x[3, -3:] = 100.0  # the largest entries in the last columns
    x = x.to(device)
    vals, idx = row_topk(x, m)
    ref = x.topk(m, dim=1, sorted=False).values
    assert torch.equal(vals.sort(1).values, ref.sort(1).values)
    assert torch.equal(x.gather(1, idx), vals)
    assert bool((idx.sort(1).values.diff(dim=1) > 0).all())  # distinct latents per row
    w = torch.randn(3, d).to(device).requires_grad_()
    row_topk(w, m)[0].sum().backward()
    assert int((w.grad != 0).sum()) == 3 * m


# -- screened selection: bf16 candidates, certified, exact values ---------------------------------------------
SCREENABLE = ["linear", "cosine_global", "cosine_per_feature", "cosine_base_delta", "cosine_grouped", "magnitude_bypass"]


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_screen_error_bound_holds_for_every_entry(scale, with_bias, device):
    """|s~ - s| <= 2.05 u |s~| + slack_n for every entry, s computed in float64; and the bound is tight enough
    to be useful (slack an order of magnitude below the scores' spread, and within 40x of the largest error)."""
    from saelab.kernels.scores import ScoreOperands
    from saelab.kernels.screen import BF16_U as _BF16_U, screen_scores, screen_slack

    torch.manual_seed(3)
    L = torch.randn(300, 96) * scale
    L[:5] *= 50  # a few large-norm rows
    R_T = torch.randn(700, 96) / 10
    R_T[::7] *= 3  # uneven column norms
    bias = torch.randn(700) * scale / 10 if with_bias else None
    L, R_T, bias = L.to(device), R_T.to(device), None if bias is None else bias.to(device)
    ops = ScoreOperands(L, R_T, bias, relu=False)
    approx = screen_scores(ops).double()
    exact = L.double() @ R_T.double().T + (bias.double() if with_bias else 0)
    bound = 2.05 * _BF16_U * approx.abs() + screen_slack(ops).double().unsqueeze(1)
    err = (approx - exact).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(err.max()) > 0  # bf16 really is approximate here
    assert bool((screen_slack(ops).double() < 0.15 * exact.std(1)).all())  # per token
    assert float(bound.min(1).values.max() / err.max()) < 40


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("a_spread", [0.0, 0.5, 3.0])
def test_scaled_screen_error_bound_holds_for_every_entry(a_spread, with_bias, device):
    """With a per-latent scale law ``s = exp(a_i ln||x|| + b_i) (L . R_i) + bias_i`` (the per-feature / grouped
    cosine encoders) the epilogue's bound ``|s~ - s| <= 3.1 u |s~| + slack_n`` holds on every entry (float64
    reference), for token norms spanning 1e-2..1e3 and exponents ``a`` up to +-3."""
    from saelab.kernels.scores import ScoreOperands
    from saelab.kernels.screen import BF16_U as _BF16_U, screen_rel, screen_scores, screen_slack

    torch.manual_seed(4)
    x = torch.randn(300, 96) * torch.logspace(-2, 3, 300).unsqueeze(1)
    norm = x.norm(dim=1, keepdim=True)
    W = torch.randn(700, 96)
    R_T = W / W.norm(dim=1, keepdim=True)
    a = torch.randn(700) * a_spread
    b = torch.randn(700) * 0.5 + 2.0
    bias = torch.randn(700) if with_bias else None
    x, norm, R_T, a, b = (t.to(device) for t in (x, norm, R_T, a, b))
    bias = None if bias is None else bias.to(device)
    ops = ScoreOperands(x / norm, R_T, bias, relu=False, a=a, b=b, log_norm=norm.log().squeeze(1))
    approx = screen_scores(ops).double()
    c = torch.exp(a.double() * norm.log().double() + b.double())
    exact = c * ((x / norm).double() @ R_T.double().T) + (bias.double() if with_bias else 0)
    assert screen_rel(ops) == 3.1
    bound = 3.1 * _BF16_U * approx.abs() + screen_slack(ops).double().unsqueeze(1)
    err = (approx - exact).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(err.max()) > 0


def _screened_and_fp32(sae, fn):
    from saelab.kernels.sparse_step import set_selection_gemm

    out = []
    for mode in ("bf16", "fp32"):
        set_selection_gemm(sae, mode)
        sae.__dict__.pop("_screen_stats", None)
        out.append((fn(), sae.__dict__.get("_screen_stats")))
    return out


@pytest.mark.parametrize("activation", SELECTING)
@pytest.mark.parametrize("encoder", SCREENABLE)
def test_screened_selection_equals_the_fp32_path(encoder, activation, device):
    """Same kept pairs, loss (incl. AuxK over the dead columns, C²R) and gradients as the fp32 selection, for every
    encoder (per-latent cosine scale laws through the scaled epilogue)."""
    from saelab.kernels.sparse_step import ScreenedScores

    sae = make(encoder, activation, device=device)
    x = (torch.randn(24, D_IN, dtype=torch.float64) * 2).to(device)
    (screened, stats), (fp32, _) = _screened_and_fp32(sae, lambda: one_step(sae, x))
    assert isinstance(screened[3], ScreenedScores) and stats is not None
    assert screened[1] > 0
    assert screened[0] == pytest.approx(fp32[0], rel=1e-12)
    assert screened[1] == pytest.approx(fp32[1], rel=1e-12)
    torch.testing.assert_close(screened[2].dense(D_SAE).detach(), fp32[2].dense(D_SAE).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(screened[4], fp32[4], rtol=1e-12, atol=1e-12)
    for name, g in fp32[5].items():
        if g is not None:
            torch.testing.assert_close(screened[5][name], g, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_screened_selection_redoes_near_ties_exactly(activation, device):
    """Latents whose scores differ by less than the bf16 error bound cannot be certified from the candidates:
    those tokens are redone on exact rows, and the kept pairs still equal the fp32 selection."""
    torch.manual_seed(5)
    sae = SAE(SAEConfig(d_in=16, d_sae=64, k=4, activation=activation)).train()
    with torch.no_grad():  # 8 groups of 8 nearly identical encoder columns: near-ties everywhere
        base = torch.randn(16, 8)
        sae.W_enc.copy_(base.repeat_interleave(8, 1) * (1 + 1e-5 * torch.randn(16, 64)))
        sae.b_enc.zero_()
    sae.to(device)
    x = torch.randn(32, 16).to(device)

    def codes():
        with torch.no_grad(), torch.enable_grad():
            code, _ = sae.encode_code(x)
        return code.dense(64).detach()

    (screened, stats), (fp32, _) = _screened_and_fp32(sae, codes)
    assert stats["redone_rows"] > 0
    assert torch.equal(screened != 0, fp32 != 0)  # the same pairs ...
    torch.testing.assert_close(screened, fp32, rtol=1e-6, atol=1e-6)  # ... with fp32 values up to rounding


def test_selection_gemm_names_and_screened_scores_misuse():
    from saelab.devices import bf16_native
    from saelab.kernels.sparse_step import ScreenedScores, set_selection_gemm

    sae = make("linear", "topk", dtype=torch.float32)
    with pytest.raises(ValueError, match="fp32, bf16|auto, fp32, bf16"):
        set_selection_gemm(sae, "fp16")
    set_selection_gemm(sae, "bf16")
    _, pre = sae.encode_code(torch.randn(6, D_IN))
    assert isinstance(pre, ScreenedScores) and pre.shape == (6, D_SAE)
    with pytest.raises(AttributeError, match="set_selection_gemm"):
        pre.sum()
    assert isinstance(bf16_native(torch.device("cpu")), bool)
    set_selection_gemm(sae, "auto")
    _, pre = sae.encode_code(torch.randn(6, D_IN))
    assert isinstance(pre, ScreenedScores) == bf16_native(torch.device("cpu"))


@pytest.mark.parametrize("n_buckets", [7, 2**15, 2**15 + 1, 2**31 + 5])
def test_bucket_order_is_a_stable_sort_by_key(n_buckets, device):
    """The narrow-dtype radix sort groups pairs by latent exactly as a stable int64 sort (same permutation), at
    every key width (int16 up to 2^15 buckets, int32 up to 2^31, int64 beyond)."""
    from saelab.kernels.pairs import bucket_order

    torch.manual_seed(0)
    hi = min(n_buckets, 2**31 - 1)
    keys = torch.cat([torch.randint(0, hi, (5000,)), torch.tensor([0, hi - 1, hi - 1, 0])]).to(device)
    assert torch.equal(bucket_order(keys, n_buckets), keys.argsort(stable=True))


@pytest.mark.parametrize("mode", ["bf16", "fp32"])
@pytest.mark.parametrize("encoder", SCREENABLE)
def test_a_training_step_never_writes_the_parameters(encoder, mode, device):
    """Regression: with the column-major W_enc, ``W_enc.t()`` is contiguous, and the screened cosine operands once
    normalised it in place (every step rescaled the encoder columns to unit norm). Forward + backward must leave
    every parameter bit-identical; only the optimiser writes them."""
    from saelab.kernels.sparse_step import set_selection_gemm

    sae = make(encoder, "topk", dtype=torch.float32, device=device)
    with torch.no_grad():
        sae.W_enc.mul_(3.0)  # far from unit columns
    set_selection_gemm(sae, mode)
    before = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    one_step(sae, torch.randn(40, D_IN).to(device))
    for k, v in sae.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("encoder", ["linear", "cosine_per_feature", "magnitude_bypass"])
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_gradients_are_bitwise_reproducible_with_two_threads(encoder, activation, device):
    """Regression: advanced indexing (``b_enc[cols]``) back-propagates with atomic adds across CPU threads, so the
    ``b_enc`` gradient (and the trained weights) changed run to run; the sparse step now gathers through
    ``index_select`` (``take_rows``), whose backward adds in a fixed order.

    On CUDA, ``index_add_`` and the backward of ``index_select`` use atomics unless
    ``torch.use_deterministic_algorithms(True)`` (``TrainConfig.deterministic``): there the claim is checked under
    it, and the step must also run in that mode (an op without a deterministic CUDA kernel raises)."""
    from saelab.devices import deterministic_algorithms

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        sae = SAE(SAEConfig(d_in=64, d_sae=4096, k=32, activation=activation, encoder=encoder)).to(device).train()
        x = (torch.randn(2048, 64) * 3).to(device)
        with deterministic_algorithms(device.type != "cpu"):
            runs = [one_step(sae, x)[5] for _ in range(4)]
    finally:
        torch.set_num_threads(threads)
    for g in runs[1:]:
        for name, v in runs[0].items():
            assert v is None or torch.equal(v, g[name]), name
