"""The latent code of a batch, in the forms the SAE, the kernels and the losses pass around.

* :class:`Code`: dense ``(N, d_sae)`` values, or sparse ``(values, indices)`` of shape ``(N, w)``;
* :class:`FlatCode`: the active ``(token, latent)`` pairs in CSR order (what ``F.embedding_bag`` decodes);
* :class:`SparseCode`: a padded sparse code that also carries its :class:`FlatCode`;
* :class:`NormCode`: a code that carries ``||x - b_dec||`` for norm-restoring decoders (magnitude bypass).

Data types only: no module of saelab is imported here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Code(NamedTuple):
    """Latent code of a batch of ``N`` tokens.

    ``indices is None``: ``values`` is dense ``(N, d_sae)``. Otherwise ``values`` and ``indices`` are ``(N, w)``:
    each token's active values and the latent ids they belong to. TopK codes have ``w = k``; BatchTopK codes of
    the sparse training path (:mod:`saelab.kernels.sparse_step`) have ``w`` = the largest number of latents any token
    keeps, and shorter rows are padded with value ``0`` (at latent 0). A zero value is inactive wherever it
    sits, so ``values > 0`` masks, sums and ``index_add`` over the padded form are exact.
    """

    values: Tensor
    indices: Tensor | None = None

    def dense(self, d_sae: int) -> Tensor:
        """The code as a dense ``(N, d_sae)`` tensor (differentiable in ``values``)."""
        if self.indices is None:
            return self.values
        out = self.values.new_zeros(self.values.shape[:-1] + (d_sae,))
        return out.scatter_add_(-1, self.indices, self.values)  # add, not set: padding may repeat latent 0

    def active_mask_counts(self, d_sae: int) -> Tensor:
        """``(d_sae,)`` int64 number of tokens on which each latent is non-zero.

        Sparse codes add ``values > 0`` (0 or 1) at each entry's latent into ``d_sae`` zeros (integer sums: exact
        in any order), so no output size is read from the device (a ``bincount`` of the masked ids would read two).
        """
        if self.indices is None:
            return (self.values > 0).sum(0)
        out = torch.zeros(d_sae, dtype=torch.long, device=self.indices.device)
        return out.index_add_(0, self.indices.flatten(), (self.values > 0).flatten().long())

    def l0(self) -> Tensor:
        """``(N,)`` number of non-zero latents per token."""
        return (self.values > 0).sum(-1)


class FlatCode(NamedTuple):
    """The active ``(token, latent)`` pairs of a batch in row-major (CSR) order.

    Produced by the selecting activations' :meth:`TopK.select_pairs` (with the raw pre-activations as
    ``values``) and carried by sparse codes as ``code.flat`` (with the code values). ``offsets`` and
    ``indices`` are exactly what ``F.embedding_bag(indices, W_dec, offsets, per_sample_weights=values)``
    needs to decode variable-length rows.

    Attributes:
        values: ``(P,)`` value of each pair.
        indices: ``(P,)`` int64 latent id of each pair.
        rows: ``(P,)`` int64 token of each pair, non-decreasing.
        offsets: ``(N,)`` int64 index into the pairs of each token's first pair.
        width: ``k`` when every token has exactly ``k`` pairs (TopK, AuxK), so that the padded ``(N, k)``
            form is a view; None for variable rows (BatchTopK).
    """

    values: Tensor
    indices: Tensor
    rows: Tensor
    offsets: Tensor
    width: int | None = None

    @classmethod
    def from_padded(cls, values: Tensor, indices: Tensor) -> FlatCode:
        """All ``N * w`` entries of a padded ``(N, w)`` code (padding included, it has value 0)."""
        n, w = indices.shape
        rows = torch.arange(n, device=indices.device).repeat_interleave(w)
        return cls(values.reshape(-1), indices.reshape(-1), rows, torch.arange(0, n * w, w, device=indices.device), w)

    def to_code(self) -> Code:
        """The padded :class:`Code` ``(N, w)`` of these pairs (a :class:`SparseCode` carrying ``flat=self`` when
        rows have different lengths). Differentiable in ``values``."""
        n = self.offsets.shape[0]
        if self.width is not None:
            return Code(self.values.view(n, self.width), self.indices.view(n, self.width))
        counts = bucket_counts(self.rows, n)
        w = int(counts.max()) if n else 0  # the padded width: the one value this conversion reads from the device
        pos = torch.arange(self.rows.shape[0], device=self.rows.device) - self.offsets[self.rows]
        idx = self.indices.new_zeros(n, w).index_put_((self.rows, pos), self.indices)
        vals = self.values.new_zeros(n, w).index_put((self.rows, pos), self.values)
        return SparseCode.of(Code(vals, idx), flat=self)


def bucket_counts(keys: Tensor, n: int) -> Tensor:
    """``(n,)`` int64 number of entries of ``keys`` (int64, values in ``[0, n)``) equal to each value:
    ``torch.bincount(keys, minlength=n)`` without its host read of ``keys.max()`` (the output size is ``n``), as an
    ``index_add_`` of ones (integer sums: exact and deterministic on every device).

    Raises:
        IndexError: a key outside ``[0, n)``.
    """
    ones = torch.ones((), dtype=torch.long, device=keys.device).expand(keys.numel())
    return torch.zeros(n, dtype=torch.long, device=keys.device).index_add_(0, keys.reshape(-1), ones)


class SparseCode(Code):
    """A padded sparse :class:`Code` that also carries its pairs in CSR form as ``flat`` (:class:`FlatCode`),
    so decoders and losses skip the padding. Fields and methods are those of :class:`Code`."""

    flat: FlatCode | None = None

    @classmethod
    def of(cls, code: Code, **attrs) -> SparseCode:
        """``code`` as a :class:`SparseCode`, keeping its extra attributes and setting ``attrs`` (e.g. ``flat=``)."""
        out = cls(*code)
        out.__dict__.update(getattr(code, "__dict__", {}))
        out.__dict__.update(attrs)
        return out


def flat_pairs(code: Code) -> FlatCode:
    """The pairs of a sparse ``code`` (``indices`` set): its ``flat`` form if it carries one, else every entry of
    the padded ``(N, w)`` form (:meth:`FlatCode.from_padded`).

    Raises:
        ValueError: a dense code (``indices is None``).
    """
    if code.indices is None:
        raise ValueError("flat_pairs needs a sparse code (indices set); dense codes have no pair list")
    flat = getattr(code, "flat", None)
    return flat if flat is not None else FlatCode.from_padded(code.values, code.indices)


class NormCode(Code):
    """A :class:`Code` that also carries ``x_norm (N,) = ||x - b_dec||`` for a norm-restoring decoder.

    Produced by :meth:`SAE.encode_code` for encoders with ``restores_norm`` (magnitude bypass), so that
    ``decode_code(code)`` needs no hidden state. Fields and methods are those of :class:`Code`.
    """

    x_norm: Tensor | None = None

    @classmethod
    def of(cls, code: Code, x_norm: Tensor) -> NormCode:
        out = cls(*code)
        out.__dict__.update(getattr(code, "__dict__", {}))  # keep a SparseCode's ``flat``
        out.x_norm = x_norm
        return out
