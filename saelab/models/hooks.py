"""Hook points by name: capture a module's output with an early-stopped forward, or replace it (splicing).

Two naming schemes are accepted for the residual stream after block ``L`` (0-indexed):

* the HF module path of the block, e.g. ``model.layers.15`` (also ``layers.15`` for short);
* the TransformerLens name ``blocks.15.hook_resid_post``.

Both denote the same tensor (HF ``model.layers[L]`` output = TransformerLens ``blocks.L.hook_resid_post``). Any other HF module path (e.g. ``model.layers.3.mlp``) is accepted too and
hooks that module's output. Unknown names raise a :class:`ValueError` listing the valid residual hooks.

TransformerLens names of a block's sub-module outputs are aliases of the HF module that computes that tensor
(:data:`TL_SUBMODULE_HOOKS`; Llama/Qwen/Mistral, GPT-2 and GPT-NeoX module names): ``blocks.L.hook_attn_out``
(attention output), ``blocks.L.ln1.hook_normalized`` / ``blocks.L.ln2.hook_normalized`` (the normed inputs of the
attention and of the MLP, the HF norm's output, its weight applied) and ``blocks.L.hook_mlp_out`` (MLP output).
Their canonical name is the HF module path (``model.layers.L.mlp``), the name a harvest records, so a cache made
with either spelling is the same cache. ``hook_mlp_in`` / ``hook_resid_mid`` (the residual stream *before* the
MLP's norm) are module inputs, which saelab does not capture; the error says to use ``ln2.hook_normalized``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

_TL_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
_TL_SUB = re.compile(r"^blocks\.(\d+)\.(.+)$")

TL_SUBMODULE_HOOKS: dict[str, tuple[str, ...]] = {
    "hook_attn_out": ("self_attn", "attn", "attention"),
    "ln1.hook_normalized": ("input_layernorm", "ln_1"),
    "ln2.hook_normalized": ("post_attention_layernorm", "ln_2"),
    "hook_mlp_out": ("mlp",),
}
"""TransformerLens sub-hook of block ``L`` -> names of the block's HF sub-module whose output it is, first present
wins (Llama-style ``self_attn``/``input_layernorm``/``post_attention_layernorm``/``mlp``, GPT-2 ``attn``/``ln_1``/
``ln_2``/``mlp``, GPT-NeoX ``attention``/...). A block that also has ``pre_feedforward_layernorm`` (Gemma 2/3: norms
before *and* after the attention and the MLP) is refused for the MLP and ln2 aliases, whose TL meaning differs
there; name the HF module instead."""

_TL_MODULE_INPUTS = ("hook_mlp_in", "hook_resid_mid", "hook_resid_pre", "hook_attn_in")


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook point.

    Attributes:
        hook_name: canonical TransformerLens-style name when it is a residual hook
            (``blocks.L.hook_resid_post``), else the HF module path.
        module_path: dotted HF module path of the hooked module.
        layer: index of the block whose output (or sub-module) is hooked.
        module: the module itself.
    """

    hook_name: str
    module_path: str
    layer: int
    module: nn.Module


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the list of transformer blocks of a causal LM.

    Works for any architecture whose blocks sit in one ``nn.ModuleList`` of length
    ``config.num_hidden_layers`` (Llama ``model.layers``, GPT-2 ``transformer.h``, GPT-NeoX
    ``gpt_neox.layers``, ...).

    Returns:
        (dotted path, the ModuleList).

    Raises:
        ValueError: if no such list exists.
    """
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    n = getattr(text_cfg, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            return name, mod
    raise ValueError(f"could not find the transformer blocks of {type(model).__name__}")


def valid_hook_names(model: nn.Module) -> list[str]:
    """The residual-stream hook names of ``model`` in both schemes."""
    path, layers = decoder_layers(model)
    return [f"blocks.{i}.hook_resid_post" for i in range(len(layers))] + [f"{path}.{i}" for i in range(len(layers))]


def _submodule_path(block: nn.Module, sub: str) -> str | None:
    """The block-relative path of TL sub-hook ``sub`` (:data:`TL_SUBMODULE_HOOKS`), or ``None`` when the block has
    none of its modules. Raises ValueError for the MLP aliases of a Gemma-style block."""
    children = dict(block.named_children())
    if sub in ("ln2.hook_normalized", "hook_mlp_out") and "pre_feedforward_layernorm" in children:
        raise ValueError(f"{sub} is ambiguous in a block with norms before and after its MLP (Gemma-style); name the "
                         f"HF module (e.g. ...pre_feedforward_layernorm or ...mlp)")
    return next((name for name in TL_SUBMODULE_HOOKS[sub] if name in children), None)


def tl_alias_names(model: nn.Module) -> list[str]:
    """Every TransformerLens sub-hook name (:data:`TL_SUBMODULE_HOOKS`) that ``model``'s blocks have, in layer order
    (what globs such as ``blocks.*.hook_mlp_out`` match besides the residual hooks)."""
    _, layers = decoder_layers(model)
    out = []
    for i, block in enumerate(layers):
        for sub in TL_SUBMODULE_HOOKS:
            try:
                if _submodule_path(block, sub) is not None:
                    out.append(f"blocks.{i}.{sub}")
            except ValueError:
                pass
    return out


def resolve_hook(model: nn.Module, hook_name: str) -> HookPoint:
    """Resolve a hook name to a module of ``model``.

    Args:
        model: a causal LM.
        hook_name: ``blocks.L.hook_resid_post``, ``model.layers.L``, ``layers.L``, any HF module path
            below a block, or a TransformerLens sub-hook alias (:data:`TL_SUBMODULE_HOOKS`, e.g.
            ``blocks.L.hook_mlp_out``).

    Returns:
        The resolved :class:`HookPoint`; a sub-hook alias gets its HF module path as ``hook_name``.

    Raises:
        ValueError: unknown name or layer out of range (the message lists the valid hooks), a module-input hook
            (``hook_mlp_in``, ``hook_resid_mid``, ...; the message names the output hook to use), or an MLP alias of
            a Gemma-style block.
    """
    path, layers = decoder_layers(model)
    n = len(layers)

    def fail(why: str) -> ValueError:
        return ValueError(
            f"unknown hook {hook_name!r} ({why}). Valid residual hooks: blocks.0.hook_resid_post .. "
            f"blocks.{n - 1}.hook_resid_post, or the HF module paths {path}.0 .. {path}.{n - 1} "
            "(any HF module path below a block also works, and the TransformerLens sub-hooks blocks.L.hook_attn_out, "
            "blocks.L.ln1.hook_normalized, blocks.L.ln2.hook_normalized, blocks.L.hook_mlp_out)"
        )

    m = _TL_RESID.match(hook_name)
    if m:
        layer = int(m.group(1))
        if layer >= n:
            raise fail(f"the model has {n} blocks")
        return HookPoint(hook_name, f"{path}.{layer}", layer, layers[layer])
    m = _TL_SUB.match(hook_name)
    if m and m.group(2) in _TL_MODULE_INPUTS:
        before = (f"blocks.{int(m.group(1)) - 1}.hook_resid_post" if int(m.group(1)) else "no hook (the embeddings)")
        raise fail(f"{m.group(2)} is a module input (the residual stream before a norm), which saelab does not "
                   f"capture; for the MLP's input use blocks.{m.group(1)}.ln2.hook_normalized, for the stream before "
                   f"the block {before}")
    if m and m.group(2) in TL_SUBMODULE_HOOKS:
        layer = int(m.group(1))
        if layer >= n:
            raise fail(f"the model has {n} blocks")
        sub = _submodule_path(layers[layer], m.group(2))
        if sub is None:
            raise fail(f"block {layer} has none of the modules {', '.join(TL_SUBMODULE_HOOKS[m.group(2)])}; name the HF "
                       f"module below {path}.{layer}")
        hook_name = f"{path}.{layer}.{sub}"  # canonical: the HF module path
    module_path = hook_name
    modules = dict(model.named_modules())
    if module_path not in modules:
        # allow paths relative to the blocks' parent (``layers.15`` for ``model.layers.15``)
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        candidate = f"{parent}.{hook_name}" if parent else hook_name
        if candidate in modules:
            module_path = candidate
        else:
            raise fail("no module with that path")
    if not module_path.startswith(path + "."):
        raise fail(f"hooks must lie inside a block ({path}.N...)")
    layer = int(module_path[len(path) + 1 :].split(".")[0])
    is_block = module_path == f"{path}.{layer}"
    canonical = f"blocks.{layer}.hook_resid_post" if is_block else module_path
    return HookPoint(canonical, module_path, layer, modules[module_path])


class _StopForward(Exception):
    """Raised inside a hook to end the forward pass early (no later blocks, no lm_head)."""


def _output_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def base_model(model: nn.Module) -> nn.Module:
    """The transformer body without the LM head (``model.model`` for Llama), or ``model`` itself."""
    prefix = getattr(model, "base_model_prefix", None)
    return getattr(model, prefix, model) if prefix else model


@torch.no_grad()
def capture(model: nn.Module, hook: HookPoint, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            past_key_values=None) -> torch.Tensor:
    """Run the model up to ``hook`` and return the hooked module's output.

    The forward pass stops right after the hooked module (an exception raised in the hook), so later
    blocks and the LM head are never computed.

    Args:
        model: a causal LM.
        hook: from :func:`resolve_hook`.
        input_ids: ``(batch, seq)`` token ids.
        attention_mask: optional ``(batch, seq)`` mask.
        past_key_values: optional KV cache of a shared prefix (transformers ``Cache``); ``input_ids`` then
            continue that prefix and only their positions are returned.

    Returns:
        ``(batch, seq, d_model)`` activations in the model's dtype.
    """
    return capture_many(model, [hook], input_ids, attention_mask, past_key_values)[hook.hook_name]


_RANGE = re.compile(r"(?<![\w-])(\d+)-(\d+)(?![\w-])")
_GLOB_CHARS = "*?["


def is_hook_pattern(name: str) -> bool:
    """Whether ``name`` is a glob (``blocks.*.hook_resid_post``) or a range (``blocks.4-8.hook_resid_post``)."""
    return any(c in name for c in _GLOB_CHARS) or _RANGE.search(name) is not None


def is_multi_hook(spec: str | Sequence[str]) -> bool:
    """Whether a ``hook_name`` value names a *set* of hooks (several names, or any glob or range) rather than one.

    A single plain name, given as a string or as a one-element list, is one hook; the harvest then writes its
    cache to ``out`` itself, as it always did.
    """
    names = [spec] if isinstance(spec, str) else list(spec)
    return len(names) > 1 or any(is_hook_pattern(n) for n in names)


def expand_hook_names(model: nn.Module, spec: str | Sequence[str]) -> list[str]:
    """Expand globs and ranges of hook names against :func:`valid_hook_names`.

    A range ``a-b`` (inclusive, ``a <= b``) in a dot-separated part stands for every integer of it
    (``blocks.4-6.hook_resid_post`` -> blocks 4, 5 and 6); a glob (``*``, ``?``, ``[...]``; :mod:`fnmatch`)
    matches the valid residual hook names of ``model`` in layer order. Plain names are kept as given (checked by
    :func:`resolve_hook`). Duplicates after expansion are left to :func:`resolve_hooks`.

    Args:
        model: a causal LM.
        spec: one name or a list of names, each plain, a glob or a range.

    Returns:
        The expanded names, in the order given (a glob's matches in layer order).

    Raises:
        ValueError: an empty list, a reversed range, or a glob that matches no valid hook (the message lists them).
    """
    names = [spec] if isinstance(spec, str) else list(spec)
    if not names:
        raise ValueError("hook_name is empty: give one hook name or several (globs and ranges allowed)")
    valid = valid_hook_names(model)
    globbable = valid + tl_alias_names(model)
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"hook names must be non-empty strings, got {name!r}")
        m = _RANGE.search(name)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if a > b:
                raise ValueError(f"hook range {name!r} is reversed ({a} > {b}); write {b}-{a}")
            out.extend(expand_hook_names(model, [name[: m.start()] + str(i) + name[m.end():]
                                                 for i in range(a, b + 1)]))
        elif any(c in name for c in _GLOB_CHARS):
            hits = [v for v in globbable if fnmatch.fnmatchcase(v, name)]
            if not hits:
                raise ValueError(f"hook pattern {name!r} matches no hook of this model; valid hooks: "
                                 f"{valid[0]} .. {valid[len(valid) // 2 - 1]} or {valid[len(valid) // 2]} .. {valid[-1]}")
            out.extend(hits)
        else:
            out.append(name)
    return out


def resolve_hooks(model: nn.Module, spec: str | Sequence[str]) -> list[HookPoint]:
    """Resolve one hook name or several (globs and ranges expanded by :func:`expand_hook_names`).

    Names denoting the same hook (``blocks.3.hook_resid_post`` and ``model.layers.3``) are kept once, at their
    first position.

    Raises:
        ValueError: from :func:`expand_hook_names` or :func:`resolve_hook`.
    """
    hooks: dict[str, HookPoint] = {}
    for name in expand_hook_names(model, spec):
        hp = resolve_hook(model, name)
        hooks.setdefault(hp.hook_name, hp)
    return list(hooks.values())


@torch.no_grad()
def capture_many(model: nn.Module, hooks: Sequence[HookPoint], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, past_key_values=None) -> dict[str, torch.Tensor]:
    """One forward pass that captures the outputs of several hooked modules.

    A forward hook on each module stores its output; once every hook has fired the forward stops (the same
    early exit as :func:`capture`), so the pass costs the blocks up to the deepest hook, whatever the number of
    hooks. Each output is the tensor the module returned, exactly what :func:`capture` of that hook returns.

    Args:
        model: a causal LM.
        hooks: from :func:`resolve_hooks` (distinct ``hook_name``).
        input_ids: ``(batch, seq)`` token ids.
        attention_mask: optional ``(batch, seq)`` mask.
        past_key_values: optional KV cache of a shared prefix (see :func:`capture`).

    Returns:
        ``hook_name -> (batch, seq, d_model)`` activations in the model's dtype.

    Raises:
        ValueError: no hooks, or two with the same ``hook_name``.
        RuntimeError: a hook was never reached in the forward pass.
    """
    names = [h.hook_name for h in hooks]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"capture_many needs one or more distinct hooks, got {names}")
    out: dict[str, torch.Tensor] = {}

    def make(name: str):
        def fn(_mod, _inp, output):
            out[name] = _output_tensor(output)
            if len(out) == len(names):
                raise _StopForward
        return fn

    handles = [h.module.register_forward_hook(make(h.hook_name)) for h in hooks]
    try:
        base_model(model)(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                          use_cache=past_key_values is not None)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in out]
    if missing:
        raise RuntimeError(f"hooks {missing} were never reached in the forward pass")
    return {n: out[n] for n in names}


@contextmanager
def splice(hook: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the context, replace the hooked module's output ``h`` by ``fn(h)``.

    Used to splice an SAE reconstruction into the forward pass (CE/KL scores), zero-ablate a hook, or
    project out a direction. ``fn`` receives and must return a ``(batch, seq, d_model)`` tensor.
    """

    def hook_fn(_mod, _inp, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    handle = hook.module.register_forward_hook(hook_fn)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def splice_transcoder(hook_in: HookPoint, hook_out: HookPoint,
                      fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the context, replace ``hook_out``'s output ``y`` by ``fn(x, y)``, where ``x`` is ``hook_in``'s output in
    the same forward pass (e.g. a transcoder reading the MLP input and standing in for the MLP output).

    ``hook_in`` must run before ``hook_out`` in the forward pass (an upstream module). ``fn`` receives and returns
    ``(batch, seq, d)`` tensors; passing ``y`` lets it keep the model's own output at some positions.

    Raises:
        RuntimeError: ``hook_out`` ran before ``hook_in`` produced an output in this forward pass.
    """
    seen: dict[str, torch.Tensor] = {}

    def grab(_mod, _inp, output):
        seen["x"] = _output_tensor(output)

    def put(_mod, _inp, output):
        if "x" not in seen:
            raise RuntimeError(f"{hook_out.hook_name} ran before {hook_in.hook_name}: a transcoder's input hook must be "
                               "upstream of its output hook")
        if isinstance(output, tuple):
            return (fn(seen["x"], output[0]),) + tuple(output[1:])
        return fn(seen["x"], output)

    handles = [hook_in.module.register_forward_hook(grab), hook_out.module.register_forward_hook(put)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def is_block_hook(model: nn.Module, hook: HookPoint) -> bool:
    """Whether ``hook`` is a whole transformer block (``blocks.L.hook_resid_post``), so :func:`replay` applies."""
    _, layers = decoder_layers(model)
    return hook.module is layers[hook.layer]


class _Replay(nn.Module):
    """Stands in for a block up to the hook: returns its input (``fixed is None``) or a fixed tensor.

    Unknown attributes are read from the replaced block (some models read e.g. ``attention_type`` off it).
    """

    def __init__(self, orig: nn.Module, fixed: torch.Tensor | None, as_tuple: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_orig", orig)
        self._fixed, self._as_tuple = fixed, as_tuple

    def forward(self, *args, **kwargs):
        out = self._fixed
        if out is None:
            out = args[0] if args else kwargs["hidden_states"]
        return (out,) if self._as_tuple else out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_orig"), name)


@contextmanager
def replay(model: nn.Module, hook: HookPoint, h: torch.Tensor, as_tuple: bool = False) -> Iterator[HookPoint]:
    """Within the context, blocks ``0 .. hook.layer`` are skipped and the hook block outputs ``h``.

    A forward pass then costs only the blocks after the hook (+ final norm and head): the residual stream after
    block ``L`` is all that the later blocks read, so replaying a cached clean ``h`` reproduces the clean forward,
    and replaying an edited one equals :func:`splice` of that edit. The embedding lookup, rotary tables and
    attention mask are still built from ``input_ids`` by the model itself, which keeps this architecture-generic.

    Args:
        model: a causal LM.
        hook: a block hook (:func:`is_block_hook`).
        h: ``(batch, seq, d_model)`` the hook block's output to replay, in the model's dtype and device.
        as_tuple: whether the model's blocks return a tuple (older transformers) rather than a tensor; a wrong
            value gives wrong outputs, so callers check the replay against a clean forward once.

    Yields:
        A :class:`HookPoint` on the stand-in block, so :func:`splice` edits ``h`` as it would edit the real output.

    Raises:
        ValueError: ``hook`` is not a whole block.
    """
    if not is_block_hook(model, hook):
        raise ValueError(f"replay needs a block hook (blocks.L.hook_resid_post), not {hook.hook_name!r}")
    _, layers = decoder_layers(model)
    saved = [layers[i] for i in range(hook.layer + 1)]
    stub = _Replay(saved[-1], h, as_tuple)
    try:
        for i in range(hook.layer):
            layers[i] = _Replay(saved[i], None, as_tuple)
        layers[hook.layer] = stub
        yield replace(hook, module=stub)
    finally:
        for i, mod in enumerate(saved):
            layers[i] = mod
