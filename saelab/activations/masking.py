"""Token masking for masked-regularization SAE training (Narayanaswamy et al. 2026, arXiv 2604.06495).

The paper "randomly replaces tokens during training to disrupt co-occurrence patterns" with the mask string
``'...'`` and trains the SAE, with its usual loss, on the activations of the corrupted text; evaluation
always uses clean text. Its code is not public, so the details below follow the most literal reading of the
paper's text (abstract, §3 and Discussion) and are *our documented choices* where marked [INFER]:

* [INFER] **Token-level replacement before the LM forward**: a context's token ids are corrupted, then the
  LM runs on them, so every later position sees the corrupted context (the paper replaces *tokens*).
* [INFER] **1:1 replacement by a single token id** (:func:`mask_token_id`), so the sequence length and every
  position are unchanged and a masked context is row-aligned with its clean version.
* [INFER] **Independent Bernoulli(p) per position**; position 0 (BOS / prefix token) is never masked (it carries
  no content, and the harvest drops its row), nor are positions the caller protects (the harvester protects every
  special token, i.e. the document separators; see :func:`apply_mask`). ``p`` itself is unknown in the paper (its
  results "depend on masking probability"); the harvester's default is 0 (no masking) and 0.15 (BERT's rate) is the
  suggested starting point, with a sweep over {0.05, 0.1, 0.15, 0.25}.
* **Determinism**: the mask of a context depends only on ``(seed, global context index)``
  (:func:`context_generator`), never on the batch composition or on how many contexts were processed before a
  resume, so a resumed masked harvest is identical to an uninterrupted one.

Everything here is pure (no I/O); :mod:`saelab.activations.harvest` wires it into the harvest.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["DEFAULT_MASK_STRING", "mask_token_id", "context_generator", "apply_mask", "mask_contexts"]

DEFAULT_MASK_STRING = "..."
"""The paper's mask string ("We use the mask string '...' for its ne[utral ...]", arXiv 2604.06495 §4)."""

_STREAM_TAG = 0x6D61736B  # "mask": keeps this random stream apart from other uses of the same seed


def mask_token_id(tokenizer, mask_string: str = DEFAULT_MASK_STRING) -> tuple[int, str]:
    """Choose the single token id that replaces masked tokens, and say how it was chosen.

    Variants are tried in order: ``mask_string`` as given (no leading space), then with one leading space;
    the first that tokenizes (without special tokens) to exactly one token wins.

    Why no leading space first [INFER, our choice]: the paper names the mask string ``'...'`` with no space,
    and that is what ``tokenizer("...")`` gives, so it is the most literal reading of the paper. Neither
    variant is "neutral" for every replaced token under byte-level BPE: most mid-text tokens are word-initial
    and carry their space (``Ġcat``), so ``"..."`` turns ``the cat sat`` into ``the... sat`` (a space is lost),
    while ``" ..."`` would turn a continuation piece (``runn|ing``) into ``runn ...`` (a space is added). A
    trailing ``"..."`` after a word is common in real text (``word...``), so dropping a space is the milder
    distortion; and one id for every replacement keeps "mask" a single token type for the SAE. The choice is
    recorded in the cache manifest (``mask_token_id``, ``mask_choice``); override it with ``--mask_token_id``.

    For the bundled SmolLM2 tokenizer, ``"..."`` -> ``[2026]`` (chosen) and ``" ..."`` -> ``[4563]``.

    Args:
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(text, add_special_tokens=False)``).
        mask_string: the text whose token replaces masked tokens.

    Returns:
        ``(token_id, description)``, e.g. ``(2026, "'...' encodes to the single token 2026")``.

    Raises:
        ValueError: ``mask_string`` is empty, or no variant is a single token (the message lists each
            variant's tokenization and says to pass ``--mask_token_id``).
    """
    if not isinstance(mask_string, str) or not mask_string:
        raise ValueError(f"mask_string must be a non-empty string, got {mask_string!r}")
    variants = [mask_string] if mask_string.startswith(" ") else [mask_string, " " + mask_string]
    found: list[str] = []
    for i, v in enumerate(variants):
        ids = list(tokenizer(v, add_special_tokens=False)["input_ids"])
        if len(ids) == 1:
            how = f"{v!r} encodes to the single token {int(ids[0])}"
            if i > 0:
                how += f" ({variants[0]!r} is not a single token: {found[0]})"
            return int(ids[0]), how
        found.append(f"{v!r} -> {ids}")
    raise ValueError(
        f"the mask string {mask_string!r} is not a single token for this tokenizer ({'; '.join(found)}); masking "
        f"replaces one token by one token id, so choose another --mask_string or pass --mask_token_id ID"
    )


def context_generator(seed: int, index: int) -> torch.Generator:
    """A CPU :class:`torch.Generator` seeded from ``(seed, index)`` only.

    ``index`` is the global index of a context in the harvest's context stream (0 for the first context);
    the seed is derived with :class:`numpy.random.SeedSequence` (a hash of the pair), so nearby seeds and
    indices give unrelated streams.

    Raises:
        ValueError: ``seed`` or ``index`` is not a non-negative int.
    """
    for name, v in (("seed", seed), ("index", index)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    state = np.random.SeedSequence([_STREAM_TAG, int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def apply_mask(
    ids: torch.Tensor,
    p: float,
    mask_id: int,
    generator: torch.Generator,
    protect: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each token independently with probability ``p`` by ``mask_id`` (1:1, length unchanged).

    One uniform number is drawn per position (``(B, T)`` in row-major order, on the generator's device) for
    every position, eligible or not, so whether position ``t`` is masked depends only on the generator state
    and on ``protect``, never on which other positions are protected.

    Never masked:
        * position 0 (the BOS / prefix token, which carries no content);
        * positions where ``protect`` is True. The harvester protects every special token, i.e. the document
          separators inside packed contexts [INFER, our choice]: a separator is structure, not content;
          replacing it would silently merge two documents into one context (changing every later activation
          in a way that is not the "co-occurrence disruption" the paper intends), and it keeps the set of
          special (dropped) positions the same as in the clean stream.

    Args:
        ids: ``(B, T)`` integer token ids (any device).
        p: masking probability in ``[0, 1]``; 0 returns ``ids`` unchanged.
        mask_id: the replacement token id (see :func:`mask_token_id`), ``>= 0``.
        generator: source of randomness (for per-context determinism use one :func:`context_generator` per
            context, as :func:`mask_contexts` does).
        protect: optional ``(B, T)`` bool tensor of positions that must not be masked.

    Returns:
        ``(ids_masked, mask)``: ``ids_masked`` ``(B, T)`` same dtype/device as ``ids``, equal to ``ids``
        except ``mask_id`` where ``mask`` is True; ``mask`` ``(B, T)`` bool, True where the draw replaced the
        token. A token that already equals ``mask_id`` (a literal "..." in the text) is unchanged by the
        replacement but still counts as masked if drawn.

    Raises:
        ValueError: ``ids`` not 2-D integer, ``p`` outside ``[0, 1]``, negative ``mask_id``, or ``protect`` of
            another shape or not bool.
    """
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be a (B, T) integer tensor, got {getattr(ids, 'dtype', type(ids))} "
                         f"{list(getattr(ids, 'shape', []))}")
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"mask probability p must be in [0, 1], got {p!r}")
    if not isinstance(mask_id, (int, np.integer)) or isinstance(mask_id, bool) or mask_id < 0:
        raise ValueError(f"mask_id must be a non-negative int, got {mask_id!r}")
    if protect is not None and (not isinstance(protect, torch.Tensor) or protect.dtype != torch.bool
                                or protect.shape != ids.shape):
        raise ValueError(f"protect must be a bool tensor of shape {list(ids.shape)}, got "
                         f"{getattr(protect, 'dtype', type(protect))} {list(getattr(protect, 'shape', []))}")
    u = torch.rand(tuple(ids.shape), generator=generator, device=generator.device)
    mask = (u < float(p)).to(ids.device)
    mask[:, 0] = False
    if protect is not None:
        mask &= ~protect.to(ids.device)
    return torch.where(mask, torch.as_tensor(int(mask_id), dtype=ids.dtype, device=ids.device), ids), mask


def mask_contexts(
    ids: torch.Tensor,
    p: float,
    mask_id: int,
    seed: int,
    context_indices: Iterable[int],
    protect: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_mask` with one :func:`context_generator` ``(seed, context_indices[i])`` per row.

    The mask of row ``i`` is a function of ``(seed, context_indices[i], T, p, protect[i])`` only, so a context
    gets the same mask whatever batch it is in and however many contexts came before a resume.

    Args:
        ids: ``(B, T)`` integer token ids.
        p, mask_id, protect: as in :func:`apply_mask`.
        seed: non-negative int, the mask seed (``HarvestConfig.mask_seed``).
        context_indices: ``B`` non-negative global context indices, one per row.

    Returns:
        ``(ids_masked, mask)`` as in :func:`apply_mask`, both ``(B, T)``.

    Raises:
        ValueError: as :func:`apply_mask`, or ``len(context_indices) != B``.
    """
    idx = [int(i) for i in context_indices]
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        raise ValueError(f"ids must be a (B, T) integer tensor, got {list(getattr(ids, 'shape', []))}")
    if len(idx) != ids.shape[0]:
        raise ValueError(f"got {len(idx)} context indices for {ids.shape[0]} contexts")
    if protect is not None and (not isinstance(protect, torch.Tensor) or protect.shape != ids.shape):
        raise ValueError(f"protect must be a bool tensor of shape {list(ids.shape)}")
    outs, masks = [], []
    for r, ci in enumerate(idx):
        o, m = apply_mask(ids[r:r + 1], p, mask_id, context_generator(seed, ci),
                          None if protect is None else protect[r:r + 1])
        outs.append(o)
        masks.append(m)
    if not idx:
        return ids.clone(), torch.zeros_like(ids, dtype=torch.bool)
    return torch.cat(outs), torch.cat(masks)
