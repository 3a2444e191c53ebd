"""saelab: train and evaluate sparse autoencoders on transformer LM activations.

Public API (see the README for the command line)::

    from saelab import SAE, SAEConfig, load_sae, save_sae          # the SAE module and SAELens-layout files
    from saelab import load_lm, harvest, HarvestConfig             # models and activation caches
    from saelab import train_sae, TrainConfig                      # training (saelab.train is the module)
    from saelab import run_suite                                   # evaluation suites
"""

from .activations.harvest import HarvestConfig, harvest
from .models.lm import load_lm
from .sae.config import SAEConfig
from .sae.model import SAE
from .sae.saving import load_sae, save_sae
from .train import TrainConfig
from .train import train as train_sae


def run_suite(*args, **kwargs):
    """Run an evaluation suite by name; see :func:`saelab.evals.run_suite`."""
    from .evals import run_suite as _run

    return _run(*args, **kwargs)


__all__ = ["SAE", "SAEConfig", "load_sae", "save_sae", "load_lm", "harvest", "HarvestConfig", "train_sae", "TrainConfig", "run_suite"]
