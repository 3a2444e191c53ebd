"""saelab's SAE training step against sparsify and SAELens on the same config, in the same run.

One training step = forward + backward + Adam, plus whatever each library's own trainer does every step
(decoder-norm constraints, gradient clipping, dead-latent bookkeeping); the table notes list it per library.
All contestants get the same input batch ``x (batch, d_in)`` (standard normal, fp32) and are timed
INTERLEAVED: after ``--warmup`` steps each, every round times one step of every contestant (the order reversed
on odd rounds), so machine noise hits all of them alike; tokens/s is ``batch / median(step time)``. The fp32
GEMM rate is measured in the same rounds and gives the encoder-matmul bound ``rate / (2 d_in d_sae)`` tokens/s,
as in ``bench_step.py``.

* saelab: ``bench_step.Stepper`` (imported, so both scripts time the same step: the trainer's step through the
  public API ``saelab.sae.model.SAE``, with the trainer's fused Adam), for topk and batchtopk (and topk + AuxK).
* sparsify (``eai-sparsify``): ``SparseCoder`` (TopK) with the per-step sequence of ``sparsify.Trainer``
  (``loss_fn="fvu"``, ``optimizer="adam"``): unit-norm decoder, ``forward(x, dead_mask=...)``, fvu (+ AuxK),
  backward, remove the decoder-parallel gradient, Adam, fired-latent counters.
* SAELens (``sae-lens``): ``TopKTrainingSAE`` (dense and ``use_sparse_activations``) and
  ``BatchTopKTrainingSAE`` driven by ``SAETrainer.step`` itself (its public per-batch seam).

``--harvest`` times the activation harvest instead: saelab's bare early-stopped forward and full harvest,
SAELens's ``CacheActivationsRunner`` (``model_class_name="AutoModelForCausalLM"`` on the same dense local
SmolLM2-135M copy, the same token contexts, early stop after the hooked layer) and the full forward + hook
that ``sparsify.Trainer`` runs per batch (sparsify has no harvest: it trains from the live forward).

The peers are optional: install them with ``bash benchmarks/setup_peers.sh``; missing ones are skipped with a
message. Usage (numbers are only comparable under the project's CPU lock)::

    nice -n 19 flock /tmp/saelab-cpu.lock .venv/bin/python benchmarks/bench_peers.py [--threads 2] [--auxk]
    nice -n 19 flock /tmp/saelab-cpu.lock .venv/bin/python benchmarks/bench_peers.py --harvest --repeats 3
"""

from __future__ import annotations

import importlib.metadata as md
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from saelab.runtime import tune_cpu_memory

tune_cpu_memory()  # as the `saelab` command does, before torch loads (SAELAB_TUNE_MEMORY=0 to time without)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402  (our step lives there; both scripts time the same function)
from _common import apply_threads, step_parser  # noqa: E402  (flags shared with bench_step.py)

from saelab.devices import resolve_device, synchronize  # noqa: E402
from saelab.sae.config import SAEConfig  # noqa: E402
from saelab.sae.model import SAE  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse invariant checks")  # SAELens's COO activations, every step
SETUP_HINT = "bash benchmarks/setup_peers.sh"

NOTES = {
    "saelab": "`bench_step.Stepper` (the trainer's step, default sparse TopK/BatchTopK path with the trainer's "
              "selection_gemm auto: bf16-screened where bf16 is fast): encode_code + "
              "decode_code, MSE + AuxK/32 (a no-op without dead latents), backward, remove decoder-parallel grad, "
              "clip grad norm 1.0, fused Adam (the trainer's), renormalise decoder rows, fired counts "
              "(batchtopk: threshold EMA not updated)",
    "sparsify": "as `sparsify.Trainer` (fvu loss, `optimizer=adam`): set decoder rows to unit norm, "
                "`SparseCoder.forward(x, dead_mask)` (fused TopK encoder with sparse backward, eager "
                "`embedding_bag` decoder: no Triton on CPU), fvu (+ AuxK), backward, remove decoder-parallel grad, "
                "Adam, fired counters; no grad clipping (sparsify has none)",
    "SAELens": "`SAETrainer.step`: `training_forward_pass` (dense `(B, d_sae)` code and dense decode unless "
               "`use_sparse_activations`; decoder-norm rescaling of pre-activations, its default), MSE (+ AuxK), "
               "fired counters, backward, clip grad norm 1.0, Adam, constant LR scheduler; no decoder-norm "
               "constraint (it rescales by the norm instead); batchtopk: + threshold EMA",
}


@dataclass
class Contestant:
    """One (library, architecture) pair: ``step()`` runs one full training step on the shared batch."""

    library: str
    arch: str
    version: str
    step: Callable[[], None]
    probe: torch.Tensor  # a parameter, to check that the steps really train
    times: list[float] = field(default_factory=list)


def _saelab_version() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return md.version("saelab") + (f" @ {rev}" if rev else "")


# -- saelab ---------------------------------------------------------------------------------------------
def make_saelab(arch: str, args, x: torch.Tensor, auxk: bool = False) -> Contestant:
    """saelab's step exactly as ``bench_step.py`` times it (``bench_step.Stepper``: the trainer's step with the
    trainer's fused Adam), on the shared batch; ``auxk`` marks ``--dead_frac`` of the latents dead."""
    label = arch + (" + AuxK" if auxk else "")
    if hasattr(bench_step, "Stepper"):
        stepper = bench_step.Stepper(args, arch, "linear", "fused", [], args.dead_frac if auxk else 0.0)
        stepper.x = x  # the batch every contestant gets
        return Contestant("saelab", label, _saelab_version(), stepper, stepper.sae.W_enc)
    if auxk:  # an older bench_step (plain step_fn) has no AuxK term
        raise AttributeError("this bench_step.py has no Stepper (AuxK); rerun without --auxk")
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=args.d_in, d_sae=args.d_sae, activation=arch, k=args.k)).to(args.device).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    return Contestant("saelab", label, _saelab_version(), lambda: bench_step.step_fn(sae, opt, x), sae.W_enc)


# -- sparsify -------------------------------------------------------------------------------------------
def make_sparsify(args, x: torch.Tensor, auxk: bool) -> Contestant:
    """sparsify's ``SparseCoder`` (TopK, ``num_latents = d_sae``) stepped as ``sparsify.Trainer`` does per batch
    (sparsify/trainer.py: unit-norm decoder before the forward, fvu + auxk_alpha AuxK, parallel-gradient removal,
    Adam with its ``2e-4 / sqrt(d_sae / 2^14)`` learning rate); ``auxk`` holds ``--dead_frac`` of latents dead."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(args.d_in, SparseCoderConfig(num_latents=args.d_sae, k=args.k), device=args.device,
                      dtype=torch.float32)
    # sparsify.Trainer's Adam learning rate rule and its first-step b_dec init (mean of the batch)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (args.d_sae / 2**14) ** 0.5)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    auxk_alpha = 1 / 32 if auxk else 0.0
    dead = (torch.arange(args.d_sae, device=args.device) < int(args.dead_frac * args.d_sae)) if auxk else None
    since_fired = torch.zeros(args.d_sae, dtype=torch.long, device=args.device)
    did_fire = torch.zeros(args.d_sae, dtype=torch.bool, device=args.device)

    def step() -> None:
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x, x, dead_mask=dead, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()

    arch = "topk + AuxK" if auxk else "topk"
    return Contestant("sparsify", arch, md.version("eai-sparsify"), step, sae.encoder.weight)


# -- SAELens --------------------------------------------------------------------------------------------
def make_saelens(arch: str, args, x: torch.Tensor, sparse_acts: bool = False, auxk: bool = False) -> Contestant:
    """SAELens's ``TopKTrainingSAE``/``BatchTopKTrainingSAE`` (default config) stepped by ``SAETrainer.step``;
    ``sparse_acts`` uses its COO activations, ``auxk`` holds ``--dead_frac`` of the latents dead."""
    import sae_lens
    from sae_lens import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, SAETrainer, TopKTrainingSAE,
                          TopKTrainingSAEConfig)
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(0)
    common = dict(d_in=args.d_in, d_sae=args.d_sae, k=args.k, dtype="float32", device=args.device)
    if arch == "topk":
        # sparse (COO) activations need rescale_acts_by_decoder_norm=False: with the default True, backward fails
        # on CPU in sae-lens 6.54 / torch 2.13 ("Could not run 'aten::view' with arguments from the 'SparseCPU'")
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common, use_sparse_activations=sparse_acts,
                                                    rescale_acts_by_decoder_norm=not sparse_acts))
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    window = 1000
    trainer = SAETrainer(
        cfg=SAETrainerConfig(total_training_samples=10**12, train_batch_size_samples=args.batch, lr=3e-4, lr_end=3e-5,
                             device=args.device, dead_feature_window=window),
        sae=sae, data_provider=iter(()),  # lr_end: what LanguageModelSAERunnerConfig fills in (lr / 10)
    )
    n_dead = int(args.dead_frac * args.d_sae)

    def step() -> None:
        if auxk:  # the same fixed dead set as sparsify's row; SAELens's AuxK is on by default (coefficient 1)
            trainer.n_forward_passes_since_fired[:n_dead] = window + 1
        trainer.step(x)

    label = arch + (" (sparse acts, no norm rescale)" if sparse_acts else "") + (" + AuxK" if auxk else "")
    return Contestant("SAELens", label, sae_lens.__version__, step, sae.W_enc)


def _peer(name: str, dist: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError as e:
        print(f"[skip] {dist} is not installed in this environment ({e}); install the peers with `{SETUP_HINT}`")
        return False


def gemm_seconds(args) -> float:
    """One ``(batch, d_in) @ (d_in, d_sae)`` fp32 matmul, as ``bench_step.py`` measures the GEMM rate."""
    a = torch.randn(args.batch, args.d_in, device=args.device)
    b = torch.randn(args.d_in, args.d_sae, device=args.device)
    synchronize(args.device)
    t = time.perf_counter()
    a @ b
    synchronize(args.device)
    return time.perf_counter() - t


# -- harvest (--harvest) --------------------------------------------------------------------------------
def harvest_main(args) -> None:
    """Harvest throughput on the bundled model, interleaved rounds: saelab's bare early-stopped forward and
    full harvest (as ``bench_harvest.py``), SAELens's ``CacheActivationsRunner`` on the same local model and
    the same token contexts, and the full forward + hook that ``sparsify.Trainer`` runs per batch (sparsify
    has no harvest: it trains on the fly)."""
    import itertools
    import tempfile

    from saelab.activations.harvest import HarvestConfig, harvest
    from saelab.data.split import DataConfig, iter_contexts, training_order
    from saelab.models.hooks import capture, resolve_hook
    from saelab.models.lm import load_lm

    lm = load_lm()
    hook = resolve_hook(lm.model, args.hook)
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", args.hook)
    if not m:
        raise ValueError(f"--harvest needs --hook blocks.L.hook_resid_post (SAELens hooks model.layers.L), got {args.hook!r}")
    layer = int(m.group(1))
    local = lm.model.config.name_or_path  # the dense local copy saelab loads (no hub)
    docs = training_order(DataConfig(), 0)  # the harvest's order, parsed once per process (peers get tokens ready)
    n_ctx = max(1, args.n_tokens // args.context_size // args.batch_size) * args.batch_size
    ctxs = [c[0] for c in itertools.islice(iter_contexts(lm, docs, args.context_size), n_ctx)]
    batches = [torch.stack(ctxs[i : i + args.batch_size]) for i in range(0, len(ctxs), args.batch_size)]
    n_all = len(ctxs) * args.context_size
    rows: dict[str, list[float]] = {}
    versions = {"saelab": _saelab_version()}

    def bare() -> float:
        t = time.perf_counter()
        for b in batches:
            capture(lm.model, hook, b)
        return n_all / (time.perf_counter() - t)

    def ours() -> float:
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            cache = harvest(HarvestConfig(hook_name=args.hook, out=d, n_tokens=int(n_all * 0.99),
                                          batch_size=args.batch_size, context_size=args.context_size,
                                          progress=False), lm=lm)
            return cache.n_tokens / (time.perf_counter() - t)

    def full_forward() -> float:  # what sparsify.Trainer runs per batch: model(x) with a hook on the layer
        def fn(_m, _i, out):
            fn.h = out[0] if isinstance(out, tuple) else out
        handle = hook.module.register_forward_hook(fn)
        try:
            t = time.perf_counter()
            with torch.no_grad():
                for b in batches:
                    lm.model(b)
            return n_all / (time.perf_counter() - t)
        finally:
            handle.remove()

    contestants: list[tuple[str, Callable[[], float]]] = [
        ("saelab: early-stopped forward (all tokens)", bare),
        ("saelab: harvest (stored tokens)", ours),
    ]
    if _peer("sae_lens", "sae-lens==6.54.0"):
        import sae_lens
        from datasets import Dataset
        from sae_lens import CacheActivationsRunner
        from sae_lens.config import CacheActivationsRunnerConfig

        versions["SAELens"] = sae_lens.__version__
        ds = Dataset.from_dict({"input_ids": [c.tolist() for c in ctxs]})
        # one shard per 8 LM batches (never more than the data: SAELens fills whole buffers, cycling the data)
        shard_tokens = min(8 * args.batch_size, len(ctxs)) * args.context_size
        sl_hook = f"model.layers.{layer}"  # HF module path: HookedProxyLM hooks it, stops after it

        def saelens() -> float:
            with tempfile.TemporaryDirectory() as d:
                cfg = CacheActivationsRunnerConfig(
                    dataset_path="in-memory", model_name=local, model_class_name="AutoModelForCausalLM",
                    model_batch_size=args.batch_size, hook_name=sl_hook, d_in=lm.d_model, training_tokens=n_all,
                    context_size=args.context_size, new_cached_activations_path=f"{d}/acts", shuffle=False,
                    device="cpu", prepend_bos=False, dtype="float32",
                    buffer_size_gb=(shard_tokens * lm.d_model * 4 + 1) / 1e9,  # default 2 GB would loop the data
                )
                runner = CacheActivationsRunner(cfg, override_dataset=ds)  # loads the model: not timed
                t = time.perf_counter()
                out = runner.run()
                dt = time.perf_counter() - t
                if not hasattr(saelens, "checked"):  # same activations as ours for the first context
                    got = torch.tensor(out[0][sl_hook])
                    ref = capture(lm.model, hook, ctxs[0][None])[0]
                    saelens.checked = (float((got - ref).abs().max()), float(ref.abs().max()))
                return len(out) * args.context_size / dt

        contestants.append(("SAELens: CacheActivationsRunner (stored tokens)", saelens))
    if _peer("sparsify", "eai-sparsify==1.3.3"):
        versions["sparsify"] = md.version("eai-sparsify")
        contestants.append(("sparsify: full forward + hook (its Trainer's per-batch path)", full_forward))

    bare()  # warm-up
    for r in range(args.repeats):
        for name, fn in (contestants if r % 2 == 0 else contestants[::-1]):
            rows.setdefault(name, []).append(fn())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {lm.name} {args.hook}, "
          f"{len(ctxs)} contexts of {args.context_size} tokens in batches of {args.batch_size}; median of "
          f"{args.repeats} interleaved rounds; versions {versions}")
    base = statistics.median(rows[contestants[0][0]])
    print("\n| path | tokens/s | ÷ early-stopped forward |")
    print("|---|---|---|")
    for name, _ in contestants:
        v = statistics.median(rows[name])
        print(f"| {name} | {v:,.0f} | {v / base:.2f} |")
    for _, fn in contestants:
        if hasattr(fn, "checked"):
            diff, scale = fn.checked
            print(f"\nSAELens's stored activations vs saelab's capture (first context): max |diff| = {diff:.2e} "
                  f"(max |activation| {scale:.1f}; batch of 8 vs 1 changes fp32 summation order)")


def main() -> None:
    """Parse the flags, build the contestants, time them interleaved and print the markdown table."""
    p = step_parser(__doc__, threads=2, warmup_help="untimed steps per contestant before the rounds",
                    repeats_help="timed rounds (one step of each contestant per round)")
    p.add_argument("--libraries", nargs="*", default=["saelab", "sparsify", "saelens"])
    p.add_argument("--auxk", action="store_true",
                   help="also time TopK with AuxK on (--dead_frac of the latents marked dead) in all three")
    p.add_argument("--dead_frac", type=float, default=0.5)
    p.add_argument("--harvest", action="store_true", help="time the harvest paths instead of the SAE step")
    p.add_argument("--hook", default="blocks.15.hook_resid_post", help="--harvest: the hook (blocks.L.hook_resid_post)")
    p.add_argument("--n_tokens", type=int, default=16_384, help="--harvest: tokens per harvest")
    p.add_argument("--batch_size", type=int, default=8, help="--harvest: contexts per LM batch")
    p.add_argument("--context_size", type=int, default=128, help="--harvest: tokens per context")
    args = p.parse_args()
    args.device = str(resolve_device(args.device))  # --device (_common.py); bench_step.Stepper reads args.device
    apply_threads(args)
    if args.harvest:
        harvest_main(args)
        return
    torch.manual_seed(1234)
    x = torch.randn(args.batch, args.d_in, device=args.device)

    cs: list[Contestant] = []
    libs = {s.lower() for s in args.libraries}
    if "saelab" in libs:
        cs += [make_saelab(a, args, x) for a in ("topk", "batchtopk")]
        if args.auxk:
            cs.append(make_saelab("topk", args, x, auxk=True))
    if "sparsify" in libs and _peer("sparsify", "eai-sparsify==1.3.3"):
        cs.append(make_sparsify(args, x, auxk=False))
        if args.auxk:
            cs.append(make_sparsify(args, x, auxk=True))
    if "saelens" in libs and _peer("sae_lens", "sae-lens==6.54.0"):
        cs += [make_saelens("topk", args, x), make_saelens("topk", args, x, sparse_acts=True),
               make_saelens("batchtopk", args, x)]
        if args.auxk:
            cs.append(make_saelens("topk", args, x, auxk=True))

    ok: list[Contestant] = []
    for c in cs:  # warm-up, and a check that every contestant's step changes its weights
        before = c.probe.detach().clone()
        try:
            for _ in range(max(1, args.warmup)):
                c.step()
            synchronize(args.device)
        except Exception as e:  # noqa: BLE001 - a peer's failure is reported, not fatal to the others
            if c.library == "saelab":
                raise
            print(f"[fail] {c.library} {c.arch}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        if not torch.isfinite(c.probe).all() or torch.equal(before, c.probe.detach()):
            raise RuntimeError(f"{c.library} {c.arch}: warm-up steps left the weights unchanged or non-finite")
        ok.append(c)
    cs = ok
    gemm = [gemm_seconds(args) for _ in range(2)]  # warm-up
    gemm = []
    for r in range(args.repeats):
        for c in (cs if r % 2 == 0 else cs[::-1]):
            synchronize(args.device)
            t = time.perf_counter()
            c.step()
            synchronize(args.device)
            c.times.append(time.perf_counter() - t)
        gemm.append(gemm_seconds(args))

    gflops = 2 * args.batch * args.d_in * args.d_sae / statistics.median(gemm) / 1e9
    bound = gflops * 1e9 / (2 * args.d_in * args.d_sae)
    tps = {(c.library, c.arch): args.batch / statistics.median(c.times) for c in cs}
    print(f"torch {torch.__version__}, {args.device}, threads {torch.get_num_threads()}, fp32, d_in={args.d_in} "
          f"d_sae={args.d_sae} k={args.k} batch={args.batch}; median of {args.repeats} interleaved rounds "
          f"after {args.warmup} warm-up steps")
    print(f"fp32 GEMM {gflops:.0f} GFLOP/s -> encoder-matmul bound {bound:,.0f} tokens/s\n")
    print("| library | architecture | tokens/s | % of bound | saelab ÷ this | version |")
    print("|---|---|---|---|---|---|")
    for c in cs:
        v = tps[(c.library, c.arch)]
        ours = tps.get(("saelab", re.sub(r" \(.*?\)", "", c.arch)))  # same architecture (and AuxK or not)
        ratio = f"{ours / v:.2f}×" if ours else "—"
        print(f"| {c.library} | {c.arch} | {v:,.0f} | {100 * v / bound:.1f}% | {ratio} | {c.version} |")
    print("\nWhat one step includes:")
    for lib in dict.fromkeys(c.library for c in cs):
        print(f"- {lib}: {NOTES[lib]}")
    if args.auxk:
        print(f"- AuxK rows: {args.dead_frac:.0%} of latents dead every step (k_aux = d_in / 2), so the AuxK "
              "term runs; ratios compare AuxK rows with saelab's AuxK row")


if __name__ == "__main__":
    main()
