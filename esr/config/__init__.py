"""One frozen dataclass tree for a run, loaded from YAML with dotted overrides.

    cfg = load_config("configs/quickstart.yaml", ["train.steps=20", "rollout.horizon=full"])

``schema`` holds the tree (every field with the docstring a user reads when a key is wrong) and the checks of
contradictory settings; ``io`` reads and writes it. Unknown keys and bad values raise ``ConfigError`` naming the
dotted key and the nearest valid one.
"""

from esr.config.io import apply_overrides, from_dict, load_config, save_config, to_dict
from esr.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ExtrapolateConfig,
    LogConfig,
    LoraConfig,
    LossConfig,
    MixSource,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    Select,
    TeacherConfig,
    TrainConfig,
    VllmConfig,
)

__all__ = [
    "Config", "ConfigError", "DataConfig", "EvalConfig", "ExtrapolateConfig", "LogConfig", "LoraConfig", "LossConfig",
    "MixSource",
    "ModelConfig", "OptimConfig", "RolloutConfig", "Select", "TeacherConfig", "TrainConfig", "VllmConfig",
    "apply_overrides", "from_dict", "load_config", "save_config", "to_dict",
]
