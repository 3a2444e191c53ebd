"""Regularizers on the sparse code and the decoder, chosen by name from ``REGULARIZERS``.

Each regularizer is a pure function of tensors; :class:`RegularizerSpec` adds its weight and schedule, parsed
from one string (``"c2r:lambda=5,every=5"``) or a YAML mapping (``{name: c2r, lambda: 5}``).

* ``c2r``: Cross-sample Consistency Regularization (Jin et al., ICML 2026, arXiv 2606.30609), exactly as
  ``dictionary_learning_demo/.../trainers/standard.py::compute_c2r_loss`` of the authors' repository
  (hr-jin/Cross-sample-Consistency-Regularization): each latent's nearest decoder neighbour inside a random
  chunk of latents, its squared positive cosine, weighted by the pair's batch activation norms (loss: appendix
  Eq. 19 and ``compute_c2r_loss``; schedule: the authors' ``batch_top_k.py`` trainer). By default the loss is
  rescaled so that its lambda is size-invariant (:func:`c2r_size_factor`); ``scale=raw`` keeps the authors' scaling.
* ``ortho``: the OrtSAE orthogonality penalty (dictionary_learning ``trainers/ort.py::get_orthogonal_loss``):
  the same nearest-neighbour cosine term without the activation weights.

Conventions: codes ``F (B, M)`` are the post-sparsification latent activations (what the decoder sees);
``W_dec (M, d)`` has the dictionary atoms as rows (saelab/SAELens layout; do not pass ``W_dec.T``, the
transposed-decoder bug of the C²R authors' ``trainers/jumprelu.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry
from .kernels.neighbours import PairCosSq, nearest
from .kernels.topk import take_rows

Codes = Tensor | tuple[Tensor, Tensor | None]
"""What the activation-weighted regularizers accept as the code of a batch, in any of three forms:
dense codes ``(B, M)``; a sparse code ``(values (B, k), indices (B, k))`` (e.g. a TopK
:class:`saelab.codes.Code`; a ``Code`` with ``indices=None`` counts as dense); or the
precomputed column norms ``n (M,)`` (see :func:`column_norms`)."""


# -- activation norms ---------------------------------------------------------------------------------
def _safe_sqrt(sq: Tensor) -> Tensor:
    """``sqrt(sq)`` with gradient 0 (not inf/NaN) where ``sq == 0``."""
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def column_norms(code_values: Tensor, code_indices: Tensor | None, M: int) -> Tensor:
    """Per-latent L2 norm over the batch, ``n_j = ||F[:, j]||_2 = sqrt(sum_b F_bj^2)``.

    This is the ``sqrt(sum_i (z^(i))^2)`` term of C²R (Jin et al. 2026, appendix Eq. 19;
    ``compute_c2r_loss``'s ``feature_acts.norm(p=2, dim=0)``).

    Args:
        code_values: ``(B, k)`` active values with ``code_indices (B, k)`` their latent ids, or dense codes
            ``(B, M)`` when ``code_indices`` is None.
        code_indices: ``(B, k)`` latent ids or None.
        M: number of latents.

    Returns:
        ``(M,)`` column norms, summed over the non-zero entries with ``index_add`` (the sparse form is
        never densified). A column with no activation (a dead latent) has norm 0 and receives gradient 0,
        not NaN.
    """
    if code_indices is None:
        if code_values.dim() != 2 or code_values.shape[1] != M:
            raise ValueError(f"dense codes must have shape (B, M={M}), got {tuple(code_values.shape)}")
        # post-sparsification codes are mostly zeros: summing the non-zeros is faster than a dense column
        # reduction, and its backward writes one dense gradient instead of several passes over (B, M)
        rows, cols = code_values.detach().nonzero(as_tuple=True)
        code_values, code_indices = code_values[rows, cols], cols
    elif code_values.shape != code_indices.shape:
        raise ValueError(f"code values {tuple(code_values.shape)} and indices {tuple(code_indices.shape)} differ")
    sq = code_values.new_zeros(M).index_add(0, code_indices.flatten(), code_values.flatten().square())
    return _safe_sqrt(sq)


def _norms_of(codes: Codes, M: int) -> Tensor:
    if isinstance(codes, tuple):
        values, indices = codes[0], codes[1]  # Code, NormCode or a plain (values, indices) pair
        return column_norms(values, indices, M)
    if codes.dim() == 1:
        if codes.shape[0] != M:
            raise ValueError(f"column norms must have shape (M,)=({M},), got {tuple(codes.shape)}")
        return codes
    if codes.dim() == 2:
        return column_norms(codes, None, M)
    raise ValueError(
        f"codes must be dense (B, M), sparse (values, indices) or column norms (M,); got shape {tuple(codes.shape)}"
    )


def _neighbour_cos_sq(W_dec: Tensor, chunk_size: int, generator: torch.Generator | None, search: str) -> tuple[Tensor, Tensor]:
    """``(s, nu)``: ``nu (M,)`` each latent's nearest decoder neighbour inside its random chunk (no gradient)
    and ``s_j = max(0, cos(d_j, d_nu(j)))^2 (M,)`` (gradient into ``W_dec``; 0 for a chunk of one latent).

    The chunks are ``torch.randperm(M, generator=generator)`` (drawn on ``generator``'s device, CPU by
    default, so ``generator=None`` uses and advances torch's global CPU RNG) cut into pieces of
    ``chunk_size``; with ``chunk_size >= M`` there is one chunk, no permutation is drawn and the result is
    deterministic. The search follows ``search`` (see :func:`c2r_loss`); ``s`` is always recomputed in
    ``W_dec``'s dtype from the chosen pairs, which gives the same value and gradient as ``max`` over the chunk's
    similarity row (the max passes its gradient to the argmax entry only).

    Raises:
        ValueError: ``chunk_size < 1`` or an unknown ``search``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if search not in SEARCHES:
        raise ValueError(f"unknown neighbour search {search!r}; valid: {', '.join(SEARCHES)}")
    M = W_dec.shape[0]
    Ds = F.normalize(W_dec.detach(), dim=-1)
    if chunk_size >= M:
        nu = nearest(Ds, search)
    else:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        perm = torch.randperm(M, generator=generator, device=gen_device).to(W_dec.device)
        nu = torch.empty(M, dtype=torch.long, device=W_dec.device)
        for idx in perm.split(chunk_size):
            nu[idx] = idx[nearest(Ds.index_select(0, idx), search)]
    return PairCosSq.apply(W_dec, nu), nu


SEARCHES = ("exact", "fp32", "bf16")
"""Neighbour-search methods of :func:`c2r_loss` / :func:`ortho_loss` (the regularizer spec's ``search`` key)."""


# -- losses -------------------------------------------------------------------------------------------
C2R_REFERENCE = {"d_sae": 65_536, "l0": 60.0, "batch_size": 2048}
"""The operating point at which the authors set lambda = 5 (C²R paper run: dictionary 65,536, target L0 60, SAE batch
2,048; the authors' ``pipeline.sh``). The size-invariant scaling equals their raw loss exactly there."""

C2R_SCALES = ("invariant", "raw")
"""How :func:`c2r_loss` scales the penalty: ``invariant`` multiplies the authors' loss by :func:`c2r_size_factor`
(the default of the ``c2r`` regularizer), ``raw`` is ``compute_c2r_loss`` unchanged."""


def c2r_size_factor(d_sae: int, batch_size: int, l0: float, alpha: float = 1.0) -> float:
    """The factor that makes one C²R ``lambda`` mean the same strength at any dictionary size, sparsity and batch.

    Derivation (per code entry, relative to the reconstruction gradient). Let latent j fire on about
    ``c = B L0 / M`` of the batch's ``B`` tokens with values of order ``f``. Its column norm is then
    ``n_j = ||F[:, j]|| ~ f sqrt(B L0 / M)``. The authors' loss ``(1/M) sum_j s_j (n_j + n_nu(j))^alpha`` has, on an
    active entry ``F_bj``,

        dL/dF_bj = (alpha / M) (s_j + sum_{i: nu(i) = j} s_i) (n_j + n_nu(j))^(alpha - 1) F_bj / n_j
                 ~ s f^(alpha - 1) M^(-1) (B L0 / M)^((alpha - 2) / 2),

    while the reconstruction loss ``(1/B) sum_b ||x_b - x_hat_b||^2`` has ``dMSE/dF_bj = -(2/B) e_b . d_j ~ 1/B``.
    Their ratio scales as ``R(M, B, L0) = (B / M)^(alpha / 2) L0^(alpha / 2 - 1)`` (for alpha = 1:
    ``sqrt(B / (M L0))``: the same lambda acts about 7x stronger at M 2,304, L0 32, B 2,048 than at the authors'
    M 65,536, L0 60, B 2,048). Multiplying the loss by ``R(reference) / R(M, B, L0)`` keeps the ratio at its value
    at the authors' operating point (:data:`C2R_REFERENCE`), where the factor is exactly 1.

    The derivation assumes most latents fire several times per batch (``B L0 / M`` of a few or more); where many
    fire at most once per batch, the total gradient norm over the batch falls further, by about the square root of
    the fraction of latents that fire at all.

    Args:
        d_sae: dictionary size ``M``.
        batch_size: tokens per batch ``B`` over which the column norms are taken.
        l0: mean active latents per token (measured on the batch).
        alpha: the exponent of the pair weight (paper default 1).

    Returns:
        The positive factor (1.0 at the reference point).

    Raises:
        ValueError: a non-positive size, batch or L0.
    """
    if d_sae <= 0 or batch_size <= 0 or not l0 > 0:
        raise ValueError(f"c2r_size_factor needs d_sae, batch_size and l0 > 0, got {d_sae}, {batch_size}, {l0}")

    def ratio(M: float, B: float, L0: float) -> float:
        return (B / M) ** (alpha / 2) * L0 ** (alpha / 2 - 1)

    ref = C2R_REFERENCE
    return ratio(ref["d_sae"], ref["batch_size"], ref["l0"]) / ratio(d_sae, batch_size, l0)


def _batch_and_l0(codes: Codes, batch_size: int | None, l0: float | None) -> tuple[int, float]:
    """``(B, L0)`` of the batch: given, or measured on dense / sparse codes (column norms carry neither)."""
    if batch_size is not None and l0 is not None:
        return batch_size, l0
    values = codes[0] if isinstance(codes, tuple) else codes
    if values.dim() != 2:
        raise ValueError("scale='invariant' with precomputed column norms needs batch_size= and l0= (the batch's "
                         "token count and mean active latents per token); or pass the codes themselves")
    B = values.shape[0]
    return (batch_size or B), (l0 if l0 is not None else float(torch.count_nonzero(values.detach())) / max(B, 1))


def c2r_loss(
    codes: Codes,
    W_dec: Tensor,
    *,
    alpha: float = 1.0,
    chunk_size: int = 8192,
    generator: torch.Generator | None = None,
    search: str = "exact",
    scale: str = "raw",
    batch_size: int | None = None,
    l0: float | None = None,
) -> Tensor:
    """C²R, Cross-sample Consistency Regularization (Jin et al., ICML 2026, arXiv 2606.30609).

    ``L = (1/M) sum_j s_j (n_j + n_nu(j))^alpha`` with

    * ``n_j = ||F[:, j]||_2`` the latent's activation norm over the batch (appendix Eq. 19);
    * ``nu(j) = argmax_{k in C(j), k != j} cos(d_j, d_k)``, the nearest decoder row inside ``j``'s chunk
      ``C(j)`` of a random permutation of the latents cut into chunks of ``chunk_size`` (no gradient);
    * ``s_j = max(0, cos(d_j, d_nu(j)))^2`` with ``d_j`` the decoder rows, normalised here.

    ``compute_c2r_loss`` of the authors' code (``dictionary_learning_demo/.../trainers/standard.py``), value and
    gradients, except that no permutation is drawn when ``chunk_size >= M`` (the result does not depend on it) and a
    dead latent (``n_j = 0``) gets gradient 0 where ``torch.norm`` would too. Gradients flow into the codes through
    ``n`` and into ``W_dec`` through ``s`` (and the row normalisation); ``nu`` passes none.

    Args:
        codes: the batch's post-sparsification codes, dense ``(B, M)``, sparse ``(values, indices)`` or
            precomputed column norms ``n (M,)`` (:data:`Codes`, :func:`column_norms`).
        W_dec: ``(M, d)`` decoder, one atom per row.
        alpha: exponent of the activation weight (paper default 1).
        chunk_size: neighbours are searched inside random chunks of this many latents (paper: 8192).
        generator: RNG of the chunk permutation (see :func:`_neighbour_cos_sq`); None: torch's global RNG.
        search: how the nearest neighbours are found (:data:`SEARCHES`):

            * ``"exact"`` (default): the argmax of the similarities in ``W_dec``'s dtype. For fp32 chunks of at
              least one 1024-row block on a device with a fast bf16 GEMM (:func:`saelab.devices.bf16_native`:
              CUDA, AVX-512 BF16 / AMX CPUs) it is screened by a bf16 GEMM with a certified error bound
              (:func:`saelab.kernels.neighbours._nearest_in_chunk_screened`, several times faster there); the pairs are those of ``"fp32"`` up to
              fp32 rounding of the similarities.
            * ``"fp32"``: the plain blocked search in ``W_dec``'s dtype (the reference for ``"exact"``).
            * ``"bf16"``: the search matmul in bfloat16, no certificate: a near-tie may pick another neighbour
              whose cosine is lower by at most about 4e-3 (bf16 rounding); the paper's runs used bf16 autocast.

        scale: ``"raw"`` (this function's default): the authors' loss, whose strength relative to reconstruction
            grows like ``sqrt(B / (M L0))``; ``"invariant"`` (the ``c2r`` regularizer's default): the raw loss times
            :func:`c2r_size_factor`, so that a lambda means what it means at the authors' operating point
            (:data:`C2R_REFERENCE`) at any ``d_sae``, L0 and batch size.
        batch_size, l0: the batch's token count and mean active latents per token for ``scale="invariant"``;
            measured on the codes when omitted (required with precomputed column norms).

    Raises:
        ValueError: unknown ``search`` or ``scale``, ``chunk_size < 1``, or codes of the wrong shape.

    Returns:
        Scalar loss in ``W_dec``'s dtype. Cost: ``O(M * chunk_size * d)`` for the search (no gradient),
        ``O(M d)`` plus the norms for the differentiable part.
    """
    if scale not in C2R_SCALES:
        raise ValueError(f"unknown C²R scale {scale!r}; valid: {', '.join(C2R_SCALES)}")
    M = W_dec.shape[0]
    factor = c2r_size_factor(M, *_batch_and_l0(codes, batch_size, l0), alpha) if scale == "invariant" else 1.0
    n = _norms_of(codes, M).to(W_dec.dtype)
    s, nu = _neighbour_cos_sq(W_dec, chunk_size, generator, search)
    pair = n + take_rows(n, nu)
    if alpha != 1.0:  # (0)^alpha has an infinite derivative for alpha < 1: give pairs of dead latents weight 0
        live = pair > 0
        pair = torch.where(live, torch.where(live, pair, torch.ones_like(pair)).pow(alpha), torch.zeros_like(pair))
    return (s * pair).sum() * (factor / M)


def ortho_loss(
    W_dec: Tensor,
    *,
    chunk_size: int = 8192,
    generator: torch.Generator | None = None,
    search: str = "exact",
) -> Tensor:
    """OrtSAE orthogonality penalty ``L = (1/M) sum_j max(0, cos(d_j, d_nu(j)))^2``.

    ``nu(j)`` is the nearest decoder row inside ``j``'s random chunk, as in :func:`c2r_loss` (same
    arguments); OrtSAE (dictionary_learning ``trainers/ort.py::get_orthogonal_loss``, paper weight 0.25).
    C²R is this term weighted by ``(n_j + n_nu(j))^alpha``: with equal column norms ``n``,
    ``c2r_loss = (2 n)^alpha * ortho_loss``.

    Note: ``get_orthogonal_loss`` averages the per-chunk means, which weights the latents of a short last
    chunk more when ``chunk_size`` does not divide ``M``; this is the plain mean over latents (identical
    when ``chunk_size`` divides ``M`` or exceeds it).

    Returns:
        Scalar loss in ``W_dec``'s dtype; gradient into ``W_dec``.

    Raises:
        ValueError: unknown ``search`` or ``chunk_size < 1``.
    """
    s, _ = _neighbour_cos_sq(W_dec, chunk_size, generator, search)
    return s.mean()


# -- registry and specs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Regularizer:
    """A ``REGULARIZERS`` entry.

    Attributes:
        fn: the loss; called as ``fn(codes, W_dec, **kw)`` when ``needs_codes`` else ``fn(W_dec, **kw)``.
        defaults: every valid spec key with its default: ``lambda`` (coefficient), ``every`` (T) and the
            keyword parameters of ``fn`` under their spec keys (see ``_KWARGS``).
        needs_codes: whether ``fn`` reads the batch's codes.
    """

    fn: Callable[..., Tensor]
    defaults: dict[str, Any]
    needs_codes: bool


REGULARIZERS: Registry[Regularizer] = Registry("regularizer")
REGULARIZERS.register("c2r")(
    Regularizer(c2r_loss, {"lambda": 5.0, "every": 5, "alpha": 1.0, "chunk": 8192, "search": "exact", "scale": "invariant"},
                needs_codes=True)
)
REGULARIZERS.register("ortho")(
    Regularizer(ortho_loss, {"lambda": 0.25, "every": 1, "chunk": 8192, "search": "exact"}, needs_codes=False)
)

_KWARGS = {"alpha": "alpha", "chunk": "chunk_size", "search": "search", "scale": "scale"}
"""Spec key -> keyword argument of the loss function."""


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    """``value`` (a string from the one-line form, or a YAML scalar) converted to the type of ``default``."""
    where = f"regularizer {name!r}: {key}={value!r}"
    if isinstance(value, bool):
        raise ValueError(f"{where} must be a number")
    if isinstance(default, str):
        value = str(value).strip()
        valid = {"search": SEARCHES, "scale": C2R_SCALES}.get(key, (value,))
        if value not in valid:
            raise ValueError(f"{where}: valid values: {', '.join(valid)}")
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{where} must be finite")
    if isinstance(default, int):
        if number != int(number):
            raise ValueError(f"{where} must be an integer")
        number = int(number)
    lower = {"every": 1, "chunk": 2}.get(key, 0)  # chunks of one latent have no neighbour: the loss would be 0
    if number < lower:
        raise ValueError(f"{where} must be >= {lower}")
    return number


@dataclass(frozen=True)
class RegularizerSpec:
    """A regularizer with its weight and schedule: ``loss += coefficient * every * fn(...)`` every ``every`` steps.

    Written as ``"c2r"``, ``"c2r:lambda=5,alpha=1,every=5,chunk=8192"`` or ``"ortho:lambda=0.25"``
    (:func:`parse_regularizer`), or as a mapping ``{name: c2r, lambda: 5}`` (:meth:`from_dict`). Keys missing
    take the registry defaults (the C²R paper run, authors' ``pipeline.sh``: c2r lambda 5, alpha 1, every 5, chunk
    8192; OrtSAE: ortho lambda 0.25, every 1, chunk 8192). ``search`` is ``exact`` (default), ``fp32`` or ``bf16``
    (the neighbour-search methods of :func:`c2r_loss`). C²R's ``scale`` is ``invariant`` (default: lambda means the
    strength it has at the authors' operating point, at any size; :func:`c2r_size_factor`) or ``raw`` (the authors'
    loss unchanged, whose strength grows like ``sqrt(B / (d_sae L0))``).

    Attributes:
        name: a ``REGULARIZERS`` name.
        coefficient: the weight ``lambda`` (on the training scale, i.e. E||x||^2 = 1 when inputs are normalised).
        every: ``T``: the loss is computed on steps ``0, T, 2T, ...`` and multiplied by ``T`` (the authors'
            ``trainers/batch_top_k.py``, ``aux_loss_interval``), so its average weight per step stays ``lambda``.
        params: the loss function's parameters under their spec keys (``alpha``, ``chunk``, ``search``).
    """

    name: str
    coefficient: float
    every: int = 1
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_codes(self) -> bool:
        """Whether :meth:`compute` needs the batch's codes (False: pass None)."""
        return REGULARIZERS.get(self.name).needs_codes

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RegularizerSpec:
        """Build from ``{name: c2r, lambda: 5, every: 5, alpha: 1, chunk: 8192}`` (only ``name`` required).

        Raises:
            ValueError: no or unknown name (lists the valid names), unknown key (lists the valid keys), or
                a value of the wrong type or range.
        """
        if not isinstance(d, Mapping) or "name" not in d:
            raise ValueError(f"a regularizer mapping needs a 'name' (one of {', '.join(REGULARIZERS.names())}), got {d!r}")
        name = str(d["name"]).strip()
        if name not in REGULARIZERS:
            raise ValueError(f"unknown regularizer {name!r}; valid regularizers: {', '.join(REGULARIZERS.names())}")
        defaults = REGULARIZERS.get(name).defaults
        values = dict(defaults)
        for key, value in d.items():
            if key == "name":
                continue
            if key not in defaults:
                raise ValueError(f"unknown key {key!r} for regularizer {name!r}; valid keys: {', '.join(defaults)}")
            values[key] = _coerce(name, key, value, defaults[key])
        coefficient, every = values.pop("lambda"), values.pop("every")
        return cls(name=name, coefficient=float(coefficient), every=int(every), params=values)

    def to_dict(self) -> dict[str, Any]:
        """The mapping form (inverse of :meth:`from_dict`), with every key spelled out."""
        return {"name": self.name, "lambda": self.coefficient, "every": self.every, **self.params}

    def __str__(self) -> str:
        """The one-line form (inverse of :func:`parse_regularizer`), e.g. ``c2r:lambda=5.0,every=5,alpha=1.0,chunk=8192,search=exact``."""
        d = self.to_dict()
        return d.pop("name") + ":" + ",".join(f"{k}={v}" for k, v in d.items())

    def loss(self, codes: Codes | None, W_dec: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The unweighted loss ``fn(codes, W_dec, **params)`` (for logging); ``codes`` is ignored unless :attr:`needs_codes`."""
        entry = REGULARIZERS.get(self.name)
        kw = {_KWARGS[k]: v for k, v in self.params.items()}
        if entry.needs_codes:
            if codes is None:
                raise ValueError(f"regularizer {self.name!r} needs the batch's codes")
            return entry.fn(codes, W_dec, generator=generator, **kw)
        return entry.fn(W_dec, generator=generator, **kw)

    def compute(self, step: int, codes: Codes | None, W_dec: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
        """The term to add to the training loss at ``step`` (counted from 0).

        Returns:
            None when ``step % every != 0`` (nothing is computed), else ``coefficient * every * loss``
            (the authors' ``BatchTopKTrainer.loss``: ``c2r_penalty * compute_c2r_loss(f, W_dec) * aux_loss_interval`` on
            steps ``0, T, 2T, ...``).
        """
        if step % self.every != 0:
            return None
        return self.coefficient * self.every * self.loss(codes, W_dec, generator)


def parse_regularizer(spec: str) -> RegularizerSpec:
    """Parse ``"name"`` or ``"name:key=value,key=value"``, e.g. ``"c2r:lambda=5,every=5"``.

    Raises:
        ValueError: unknown name (lists the valid names), unknown key (lists the valid keys), an item
            without ``=``, a repeated key, or a bad value.
    """
    name, _, rest = spec.strip().partition(":")
    d: dict[str, Any] = {"name": name.strip()}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"regularizer spec {spec!r}: expected key=value, got {item!r}")
        if key in d:
            raise ValueError(f"regularizer spec {spec!r}: key {key!r} given twice")
        d[key] = value.strip()
    return RegularizerSpec.from_dict(d)


def as_regularizer_spec(obj: str | Mapping[str, Any] | RegularizerSpec) -> RegularizerSpec:
    """A :class:`RegularizerSpec` from its one-line form, its mapping form, or itself."""
    if isinstance(obj, RegularizerSpec):
        return obj
    if isinstance(obj, str):
        return parse_regularizer(obj)
    return RegularizerSpec.from_dict(obj)
