"""The run config: one frozen dataclass tree, and the checks that reject contradictory settings.

Config is data: it is validated once at load and never written to at run time. Every field carries an attribute
docstring (the string under it), which is what a user reads when a key is wrong, and every numeric field its range
(``ranged(default, RANGE)``, esr/config/ranges.py), checked before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from esr.config.checks import (
    ConfigError,
    check_auto_horizon,
    check_engines,
    check_loss,
    check_mix,
    check_remote_teacher,
    check_samples,
)
from esr.config.guard import GuardConfig, GuardPolicy
from esr.config.inputs import DataConfig, MixSource, ModelConfig, TeacherConfig, TeacherEngine
from esr.config.log import LogConfig, Tracker
from esr.config.ranges import NON_NEGATIVE, POSITIVE, PROBABILITY, SEED, Range, at_least, between, check_ranges, ranged
from esr.config.rollout import Horizon, RolloutConfig, RolloutDType, RolloutEngine, VllmConfig

__all__ = ["Config", "ConfigError", "DataConfig", "EvalConfig", "ExtrapolateConfig", "GuardConfig", "GuardPolicy",
           "Horizon", "LogConfig", "LoraConfig", "LossConfig", "MixSource", "ModelConfig", "OptimConfig",
           "RolloutConfig", "RolloutDType", "RolloutEngine", "Select", "TeacherConfig", "TeacherEngine", "Tracker",
           "TrainConfig", "VllmConfig"]

LossKind = Literal["reverse_kl", "forward_kl", "jsd", "sampled", "topk"]
CrossTokenizer = Literal["aligned-exact", "span-sampled"]
Select = Literal["all", "first-n", "last-n", "middle-n", "random-n", "top-kl-n", "top-student-entropy-n",
                 "top-teacher-entropy-n", "kl*hs", "ht*hs", "kl*ht*hs"]
Finetune = Literal["lora", "full"]
DType = Literal["float32", "bfloat16", "float16", "auto"]
ExtrapolateSchedule = Literal["powers-of-two", "every"]
ExtrapolateProbe = Literal["reverse_kl", "eval"]
ExtrapolateParams = Literal["attention-mlp", "trainable"]
OptimizerState = Literal["keep", "reset"]


@dataclass(frozen=True)
class LossConfig:
    kind: LossKind = "reverse_kl"
    """`reverse_kl` KL(p_s||p_t) exact over the vocabulary (default), `forward_kl`, `jsd`, `sampled` (policy
    gradient with advantage log p_t(y) - log p_s(y), for when only sampled-token log-probs exist) or `topk` (reverse
    KL over the teacher's top `loss.top_k` tokens plus one tail bucket, esr/losses/topk.py: what a vLLM teacher's
    top-k log-probs give; every teacher engine runs it, same tokenizer only; it lower-bounds the exact KL)."""
    beta: float = ranged(0.5, PROBABILITY)
    """JSD interpolation: beta=0 is forward KL, beta=1 is reverse KL."""
    chunk_size: int = ranged(64, at_least(1))
    """Response positions per logits chunk: bounds peak memory at B x chunk x V per model."""
    cross_tokenizer: CrossTokenizer | None = None
    """For a teacher with another tokenizer: `aligned-exact` (the paper's: divergence over the shared vocabulary on
    tokens both tokenizations cut the same way) or `span-sampled` (every aligned text span, sampled estimator).
    Ignored when the vocabularies are identical."""
    select: Select = "all"
    """Which generated tokens get loss, per rollout (the paper's token-selection ablation; the horizon is the other
    knob): `all` (default), `first-n`, `last-n`, `middle-n`, `random-n`, or the n highest-scoring tokens by
    `top-kl-n` KL(p_s||p_t), `top-student-entropy-n` H(p_s), `top-teacher-entropy-n` H(p_t), or the products
    `kl*hs`, `ht*hs`, `kl*ht*hs`. Score-based selectors add a no-grad scoring pass (see esr/losses/select.py)."""
    select_n: int = ranged(100, at_least(1))
    """n of `loss.select` (tokens trained per rollout; a shorter rollout trains all of its tokens)."""
    top_k: int = ranged(20, at_least(1))
    """`loss.kind=topk`: the teacher's k most likely tokens at each position (plus one tail bucket) that the
    divergence is computed over (TRL's loss_top_k with loss_add_tail)."""
    tis_cap: float | None = ranged(None, Range(1))
    """`loss.kind=sampled` with a vLLM rollout engine: truncated importance sampling, each token's loss weighted by
    min(p_trainer(y) / p_engine(y), tis_cap) to correct the engines' numeric mismatch; None: off."""
    position_gamma: float = ranged(0.0, NON_NEGATIVE)
    """Position weighting w_t = 1 + gamma * (1 - t/T) of each token's loss (t: response position, T: rollout
    length); the loss is normalised by the batch's sum of weights. 0 weighs every token equally."""


@dataclass(frozen=True)
class LoraConfig:
    r: int = ranged(32, at_least(1))
    """LoRA rank (paper: 32)."""
    alpha: int = ranged(64, at_least(1))
    """LoRA alpha (paper: 64)."""
    dropout: float = ranged(0.0, between(0, 1, hi_open=True))
    """LoRA dropout."""
    targets: str = "all-linear"
    """`all-linear` or a comma-separated list of module names."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = ranged(200, at_least(1))
    """Optimizer steps (paper: 200)."""
    batch_size: int = ranged(16, at_least(1))
    """Prompts per step, one rollout each (paper: 16)."""
    micro_batch_size: int = ranged(4, at_least(1))
    """Sequences per training forward/backward (sampling always takes the whole batch); the loss does not depend on
    it. On a CPU 1 is both the leanest and the fastest (no left-padding to the longest prompt; BENCHMARKS.md: the
    quickstart step 38.4 s at 10.5 GB peak with 1, 41.0 s at 13.8 GB with 4); on a GPU raise it to fill the device."""
    teacher_batch_size: int | None = ranged(None, at_least(1))
    """Sequences per teacher forward (no grad, so one layer's activations at a time), rounded down to whole
    micro-batches; None: the whole batch in one pass (per process). Lower it only if the teacher's forward runs out
    of memory; wider passes are faster (BENCHMARKS.md)."""
    finetune: Finetune = "lora"
    """`lora` (adapters on all linear layers) or `full`."""
    lr: float = ranged(5e-5, POSITIVE)
    """AdamW learning rate (paper: 5e-5)."""
    weight_decay: float = ranged(0.0, NON_NEGATIVE)
    """AdamW weight decay."""
    max_grad_norm: float = ranged(1.0, NON_NEGATIVE)
    """Gradient clipping norm; 0 disables."""
    warmup_steps: int = ranged(0, at_least(0))
    """Linear warm-up steps."""
    dtype: DType = "auto"
    """`auto` is float32 on CPU and bfloat16 on GPUs that support it."""
    gradient_checkpointing: bool = False
    """Recompute student activations in the backward pass (less memory, ~30% more train time)."""
    checkpoint_every: int = ranged(50, at_least(1))
    """Write a checkpoint every this many steps (and at the end)."""
    max_nonfinite: int = ranged(3, at_least(1))
    """Stop after this many consecutive steps with a non-finite loss."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda`, `cuda:1`, ..."""
    deterministic: bool = False
    """Deterministic kernels (torch.use_deterministic_algorithms, fixed cuBLAS workspace) for bit-identical reruns
    on GPUs, at some speed cost. CPU runs with the same config and seed are identical without it."""
    fsdp: bool = False
    """Several processes (torchrun, accelerate launch): shard the decoder layers of the student and the teacher
    over them (FSDP2, esr/train/fsdp.py) instead of each process holding both models whole."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """The collapse guard (esr/train/guard.py): label-free signals against their early baselines; on a trip, roll
    back to the last checkpoint before it with a lower learning rate (`rollback`), or only warn."""


@dataclass(frozen=True)
class ExtrapolateConfig:
    enabled: bool = False
    """EffOPD: after the optimizer step at scheduled steps, jump along the update since the last such step,
    theta <- theta + alpha (theta - theta_base), while a held-out probe improves (esr/optim/extrapolate.py)."""
    schedule: ExtrapolateSchedule = "powers-of-two"
    """`powers-of-two` (steps 1, 2, 4, 8, ..., the paper's) or `every` (every `every` steps)."""
    every: int = ranged(10, at_least(1))
    """Steps between extrapolations when schedule is `every`."""
    alpha: float = ranged(2.0, POSITIVE)
    """First step size of each extrapolation; after an accepted try alpha <- alpha / (1 + alpha)."""
    max_tries: int = ranged(5, at_least(1))
    """Tries per extrapolation; the first one that does not improve the probe is rolled back and ends it."""
    carry_alpha: bool = False
    """Start each extrapolation at the previous one's last alpha instead of `alpha`."""
    probe: ExtrapolateProbe = "reverse_kl"
    """Score deciding acceptance: `reverse_kl` (mean KL(p_s||p_t) on fixed held-out student rollouts; cheap,
    task-free) or `eval` (the `eval` task's `eval.metric` on `probe_size` problems, higher is better)."""
    probe_size: int = ranged(8, at_least(1))
    """Held-out prompts (reverse_kl) or problems (eval) in the probe."""
    probe_tokens: int | None = ranged(None, at_least(1))
    """Response tokens of the probe rollouts; None: the run's first horizon (N for ESR)."""
    min_improvement: float = ranged(0.0, NON_NEGATIVE)
    """A try is accepted only if it lowers the probe's loss by more than this."""
    params: ExtrapolateParams = "attention-mlp"
    """Weights that jump: `attention-mlp` (trainable weights of the decoder's linear layers: the LoRA adapters,
    or attention and MLP matrices in full fine-tuning; the paper's) or `trainable` (every trained parameter)."""
    optimizer_state: OptimizerState = "keep"
    """AdamW moments after an accepted jump: `keep` them (the authors') or `reset` them for the moved weights."""


@dataclass(frozen=True)
class OptimConfig:
    extrapolate: ExtrapolateConfig = field(default_factory=ExtrapolateConfig)
    """EffOPD extrapolation along the update direction (off by default)."""


@dataclass(frozen=True)
class EvalConfig:
    every: int = ranged(0, at_least(0))
    """Evaluate the student every this many steps on a held-out task (0: never during training)."""
    task: str = "gsm_symbolic"
    """`gsm_symbolic` (held-out generator seed), `gsm8k`, `math500`, `jsonl` (with `eval.path`), `humaneval`,
    `bfcl:<category>`."""
    path: str | None = None
    """JSONL file of a `gsm8k`, `math500` or `jsonl` task."""
    limit: int = ranged(50, at_least(1))
    """Problems per evaluation."""
    n: int = ranged(1, at_least(1))
    """Samples per problem."""
    temperature: float = ranged(0.0, NON_NEGATIVE)
    """0: greedy (then n must be 1)."""
    max_new_tokens: int = ranged(512, at_least(1))
    """Response cap during evaluation."""
    batch_size: int = ranged(8, at_least(1))
    """Sequences generated together."""
    metric: str = "accuracy"
    """Summary key that picks the best checkpoint (higher is better), e.g. `accuracy`, `pass@4`, `maj@4`."""
    collapse_drop: float = ranged(0.3, PROBABILITY)
    """Warn of collapse when the metric falls below (1 - collapse_drop) x its first evaluation's value (and by more
    than 3 standard errors), or when the guard's eval shares rise (train.guard.eval_*)."""


@dataclass(frozen=True)
class Config:
    name: str = "run"
    """Run name; the default run folder is runs/<name>-<time>."""
    seed: int = ranged(0, SEED)
    """Seed of sampling, data order and initialisation."""
    student: ModelConfig = field(default_factory=ModelConfig)
    """The model being trained."""
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(name="qwen2.5-coder-1.5b-instruct"))
    """The model whose distribution the student is pulled toward (local, or a server with `teacher.url`)."""
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    """Experiment trackers and the samples table (metrics.jsonl is always written)."""

    def __post_init__(self) -> None:
        _check_consistency(self)


def _check_consistency(cfg: Config) -> None:
    """Reject values out of their declared range, then settings that contradict each other, with the keys to
    change."""
    check_ranges(cfg)
    r = cfg.rollout
    if r.horizon == "esr" and r.n > r.max_new_tokens:
        raise ConfigError(
            f"rollout.n={r.n} is larger than rollout.max_new_tokens={r.max_new_tokens}: ESR's N must not exceed T. "
            f"Lower rollout.n or raise rollout.max_new_tokens."
        )
    if r.horizon == "auto":
        check_auto_horizon(r)
    if r.min_new_tokens > r.max_new_tokens:
        raise ConfigError(
            f"rollout.min_new_tokens={r.min_new_tokens} exceeds rollout.max_new_tokens={r.max_new_tokens}"
        )
    e = cfg.eval
    if e.temperature == 0 and e.n > 1:
        raise ConfigError(f"eval.n={e.n} greedy samples would be identical: set eval.temperature > 0 or eval.n=1")
    check_loss(cfg.loss, Select)
    if getattr(cfg.teacher, "url", None) is not None:  # a plain ModelConfig (built in code) is a local teacher
        check_remote_teacher(cfg)
    check_engines(cfg)
    check_samples(cfg)
    if cfg.data.mix:
        check_mix(cfg, DataConfig)
