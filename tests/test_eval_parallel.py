"""saelab.evals.parallel: worker processes give the results of in-process evaluation, and failures are collected."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from saelab.evals import LMActivationStore, run_suite
from saelab.evals.core import CoreEvalConfig
from saelab.evals.parallel import EvalJob, eval_workers, run_eval_jobs
from saelab.models.lm import load_lm
from saelab.sae.config import SAEConfig
from saelab.sae.model import SAE
from saelab.sae.saving import save_sae


def test_eval_workers_rule():
    assert eval_workers(0, 10, "cpu", threads=2) == 2
    assert eval_workers(0, 1, "cpu", threads=4) == 1  # never more workers than jobs
    assert eval_workers(0, 50, "cpu", threads=64) == 8  # each worker holds a copy of the LM
    assert eval_workers(3, 10, "cuda") == 1  # an accelerator is shared by the jobs of one process
    with pytest.raises(ValueError, match="eval_workers"):
        eval_workers(-1, 3, "cpu")


@pytest.fixture()
def three_saes(tmp_path, tiny_llama_dir):
    lm = load_lm(str(tiny_llama_dir))
    dirs = []
    for i in range(3):
        torch.manual_seed(i)
        sae = SAE(SAEConfig(d_in=lm.d_model, d_sae=2 * lm.d_model, activation="topk", k=4,
                            hook_name="blocks.1.hook_resid_post", model_name=str(tiny_llama_dir)))
        dirs.append(save_sae(sae, tmp_path / f"sae{i}"))
    return lm, dirs


def test_pooled_jobs_equal_in_process_ones(three_saes, tmp_path):
    lm, dirs = three_saes
    store = LMActivationStore(lm.name, "blocks.1.hook_resid_post", root=tmp_path / "store")
    cfgs = [CoreEvalConfig(sae=str(d), n_tokens=256, context_size=32, progress=False) for d in dirs]
    seen = []
    run_eval_jobs([EvalJob("core", c, f"sae{i}") for i, c in enumerate(cfgs)], lm=lm, store=store, workers=2,
                  threads=2, on_done=lambda job, s: seen.append(job.label))
    assert sorted(seen) == ["sae0", "sae1", "sae2"] and seen[0] == "sae0"  # the first job runs here, before the pool
    for c in cfgs[1:]:  # evaluated by a worker; recompute here
        pooled = json.loads((dirs[0].parent / f"{c.sae.rsplit('/', 1)[1]}/eval_core.json").read_text())
        here = run_suite("core", c, lm=lm, store=store, write=False).to_dict()
        for key in ("l0", "fve", "kl_sae", "ce_sae", "ce_loss_score"):
            assert pooled[key] == pytest.approx(here[key], rel=1e-5, abs=1e-6), key


def test_failed_jobs_are_reported_together_and_others_finish(three_saes, tmp_path):
    lm, dirs = three_saes
    store = LMActivationStore(lm.name, "blocks.1.hook_resid_post", root=tmp_path / "store")
    shutil.rmtree(dirs[1])
    jobs = [EvalJob("core", CoreEvalConfig(sae=str(d), n_tokens=128, context_size=32, progress=False)) for d in dirs]
    with pytest.raises(RuntimeError, match=r"(?s)1 evaluation\(s\) failed.*sae1") as e:
        run_eval_jobs(jobs, lm=lm, store=store, workers=2, threads=2)
    assert "FileNotFoundError" in str(e.value)
    assert (dirs[2] / "eval_core.json").is_file()
