"""esr: on-policy distillation of language models with early-stopping rollouts.

    from esr.config import load_config
    from esr.train import train
    result = train(load_config("configs/smoke.yaml", ["train.steps=3"]))
"""

__version__ = "0.1.0"
