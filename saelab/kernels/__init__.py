"""saelab's speed layer: every hand-written kernel of the training step, behind one seam.

The model (:mod:`saelab.sae.model`) and its loss (:mod:`saelab.sae.objective`) are plain autograd. Where an SAE's
activation selects ``(token, latent)`` pairs (TopK, BatchTopK, Matryoshka BatchTopK), :meth:`SAE.encode_code`
takes the sparse step instead (:func:`saelab.kernels.sparse_step.encode_sparse`, keyed by
:func:`~saelab.kernels.sparse_step.uses_sparse_path`): one dense GEMM without autograd, then only the kept pairs
with gradient. Inside :func:`~saelab.kernels.mode.dense_reference` every SAE uses the autograd path, and the
parity tests (``tests/test_sparse_kernels.py``) compare the two on every activation x encoder.

Modules:

* :mod:`~saelab.kernels.sparse_step`: the sparse encode (scores, pair selection, differentiable pair scores);
* :mod:`~saelab.kernels.pairs`: autograd functions over pairs (encoder dots, sparse decode, Matryoshka prefixes);
* :mod:`~saelab.kernels.screen`: the certified bf16 screening, shared by the pair selection and C²R;
* :mod:`~saelab.kernels.neighbours`: C²R's / OrtSAE's nearest decoder neighbour search;
* :mod:`~saelab.kernels.scores`: encoder score GEMMs and the cosine scale law without autograd;
* :mod:`~saelab.kernels.topk`: row top-k, row dots, deterministic gathers;
* :mod:`~saelab.kernels.mode`: the switch to the dense autograd reference.
"""
