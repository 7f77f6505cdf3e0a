"""Several processes (data parallel): each takes a contiguous shard of every step's batch; one run, same weights.

    torchrun --standalone --nproc_per_node 2 -m esr train configs/smoke.yaml --out runs/ddp
    accelerate launch --multi_gpu --num_processes 2 -m esr train configs/smoke.yaml --out runs/ddp

(``--multi_gpu`` starts torchrun processes, which use the CPU where there is no GPU, or with train.device=cpu;
accelerate's ``--cpu`` runs ONE process, and its multi-CPU mode uses mpirun, whose variables esr does not read.)

Everything that differs between one process and several lives here; ``esr.train.loop`` calls these functions, which
are no-ops (or plain calls) in one process. With W processes and a step's global batch of B rows (B % W == 0):

1. Sampling. Process k samples rows [k B/W, (k+1) B/W) of the step's batch, passing their indices in the whole
   batch as ``row_ids`` and the batch's longest prompt as ``pad_to`` (``esr.rollout.sampler``): a row's randomness
   is keyed by (step seed, row index), so its tokens are the ones one process sampling all B rows draws.
2. Selection and normaliser. Selectors work per rollout, so process k selects among its own rows; ``random-n`` draws
   one (B, R) uniform tensor for the batch, so each process draws the whole batch's tensor, with R the longest
   response over all processes, and keeps its rows. The loss normaliser is the GLOBAL count (``all_reduce``):

       n_total = max(1, sum_k sum_{selected (b,t) of process k} w[b,t])

   so process k's loss, sum_{its selected} w * loss / n_total, and its gradient g_k are its share of the batch mean.
3. Gradients. After the last micro-batch's backward, ``sync_gradients`` all-reduces (SUM) every trainable gradient:
   sum_k g_k is exactly the one-process gradient of the batch mean (no 1/W). Clipping, the optimizer and the
   scheduler then run on identical gradients in every process, so the weights stay identical without broadcasts.
   Why not ``DistributedDataParallel`` (or accelerate's ``prepare``, which wraps in it)? DDP averages (1/W) and
   hooks the reducer onto ``module.forward``, but a step here runs the decoder, then the output head on detached
   chunks of hidden states, then one backward from a leaf (``esr.train.step``); the model is never called as one
   module, and wrapping it would hide the PeftModel the checkpoints and the extrapolation look for. One flat
   all-reduce per step after the backward costs the same bytes as DDP's buckets, without overlap; the LoRA
   adapters that esr mostly trains are a few MB.
4. Metrics. ``merge_metrics`` combines the processes' StepMetrics: sums (loss, token counts, FLOPs), the KL as
   sum of KL / sum of selected tokens, row means for lengths and cut share, maxima for seconds and peak memory.
5. Files. Only the main process (rank 0) writes: run.json and config.yaml, metrics.jsonl and TensorBoard
   (``NullLog`` elsewhere), progress bars and the summary, checkpoints (``main_only``: the others wait and receive
   its return value or its exception), evaluations during training, the extrapolation log. Every process loads the
   checkpoint on resume.
6. EffOPD extrapolation (``optim.extrapolate``) runs in every process on identical weights and probe data, so each
   makes the same decision; ``agree`` checks that it did (a mismatch stops the run instead of letting the weights
   drift apart). Cross-tokenizer distillation needs nothing more: translation and alignment are per rollout.
7. A graceful stop (the first Ctrl-C or SIGTERM, ``esr.train.stopping``) may reach some processes only, or reach
   them during different steps: after every step ``largest`` takes the largest signal number over the processes
   (one 1-element all-reduce; 0: none), so all of them checkpoint and stop after the same step.

Equality with one process: same rows, same tokens, same selection, same normaliser; the gradients differ only by
the order of floating-point sums (a micro-batch may hold other rows, and the all-reduce adds the shards' sums), so
final weights agree to ~1e-6 relative, not bit for bit. Sampling sees logits rounded through other batch shapes
too; a near-tie could, rarely, pick another token, after which the runs are statistically, not numerically, equal.
``lora.dropout`` > 0 draws dropout masks from each process's global RNG (all seeded alike), so such runs match one
process only in distribution.

Launchers: torchrun and ``accelerate launch --multi_gpu`` set WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR / PORT;
``join`` reads them and starts the process group (gloo on CPU, nccl on GPU with each process on GPU LOCAL_RANK).
A run that joins no group, or one process, takes the single-process path unchanged.

FSDP: with ``train.fsdp=true`` the decoder layers of both models are sharded over the processes instead
(``esr.train.fsdp``: FSDP2 on the layers only, since esr's step never calls the root module's forward; what runs
and what is refused is there). Accelerate's own FSDP config (ACCELERATE_USE_FSDP) is refused with ``FSDP_STATUS``.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from esr.config import Config, ConfigError, LossConfig
from esr.train.fsdp import check_fsdp, is_sharded
from esr.train.metrics import MetricsLog, StepMetrics
from esr.train.scores import Selection, TokenScores, select_for_step

T = TypeVar("T")

TIMEOUT = timedelta(hours=2)
"""How long a process waits at a collective: the others wait while rank 0 writes a checkpoint or evaluates."""

BUCKET_ELEMENTS = 1 << 25
"""Gradient elements per all-reduce (32M: 128 MB in float32)."""

FSDP_STATUS = ("esr shards the models itself with train.fsdp=true (decoder layers only, esr/train/fsdp.py): "
               "accelerate's FSDP plugin would shard the root module, whose forward esr's step never calls.")
"""Why accelerate's FSDP setting is refused (module docstring)."""


def world_size() -> int:
    """Processes in the run: the process group's size; 1 until ``join`` started one (or without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's index in [0, world_size()): the process group's rank, else $RANK, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0; always in one process)."""
    return rank() == 0


def check_config(cfg: Config, world: int) -> None:
    """Reject what several processes cannot run, before anything loads."""
    if cfg.train.batch_size % world:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by the {world} processes: each process samples "
            f"and trains batch_size / processes rows of a step. Use a multiple of {world}, or a number of processes "
            "that divides it")
    if ":" in cfg.train.device:
        raise ConfigError(f"train.device={cfg.train.device} names one device, but {world} processes share the run: "
                          "use train.device=auto or cuda (process k takes GPU LOCAL_RANK) or cpu")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        raise ConfigError(f"accelerate's config asks for FSDP. {FSDP_STATUS} Launch without it (`accelerate "
                          "launch --multi_gpu`, which also runs on CPUs) and set train.fsdp=true")
    check_fsdp(cfg, world)


def join(cfg: Config, run_dir: Path) -> Path:
    """Start (or reuse) the process group when the launcher asked for several processes; return the run folder
    every process uses, rank 0's (a default folder name holds the time, which may differ between processes).
    One process: checks nothing and returns ``run_dir``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        check_fsdp(cfg, world)
        return run_dir
    check_config(cfg, world)
    if not dist.is_initialized():
        backend = "gloo"
        if cfg.train.device != "cpu" and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        dist.init_process_group(backend, timeout=TIMEOUT)
        atexit.register(_leave)
    if not is_main():  # one copy of every warning, from rank 0
        logging.getLogger("esr").setLevel(logging.ERROR)
    box = [str(run_dir)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if world_size() > 1:
        dist.barrier()


def my_rows(batch_size: int) -> range:
    """This process's rows of a step's batch: [k B/W, (k+1) B/W) (all B rows in one process)."""
    w, k = world_size(), rank()
    per = batch_size // w
    return range(k * per, (k + 1) * per)


def main_only(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 only; every process returns its result, or raises its exception. The others wait
    meanwhile (a checkpoint write, an evaluation), so nothing reads a file rank 0 is still writing."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    error: BaseException | None = None
    if is_main():
        try:
            box[0] = (True, fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001  (handed to every process, then re-raised here)
            error = e
            box[0] = (False, e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}"))
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if error is not None:
        raise error
    if not ok:
        raise value
    return value


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001
        return False
    return True


def agree(value: Any, what: str) -> None:
    """Check that every process computed the same ``value`` (a decision each takes on its own)."""
    if world_size() == 1:
        return
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    if any(repr(v) != repr(values[0]) for v in values):  # repr: a NaN score equals itself
        raise RuntimeError(f"the processes disagree on {what}: {values}. Their weights would drift apart; rerun with "
                           "train.deterministic=true, or with one process")


def largest(value: int) -> int:
    """The largest ``value`` over the processes (one process: ``value``; several: one 1-element all-reduce,
    negligible beside a step's gradient sums). Every process gets the same answer, so all take the same branch."""
    if world_size() == 1:
        return value
    return int(_all_reduce([value], dist.ReduceOp.MAX)[0])


def _device() -> torch.device:
    """Where collective tensors live: the current GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values: Sequence[float], op: Any = dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=op)
    return t.tolist()


def select_for_rows(
    cfg: LossConfig, valid_B_R: torch.Tensor, response_mask_B_R: torch.Tensor, seed: int,
    scores: TokenScores | None, rows: range,
) -> Selection:
    """``esr.train.scores.select_for_step`` for this process's ``rows`` of the batch, normalised over the whole
    batch (module docstring, 2). One process: exactly ``select_for_step``."""
    w = world_size()
    if w == 1:
        return select_for_step(cfg, valid_B_R, response_mask_B_R, seed, scores)
    if cfg.select == "random-n":  # its uniforms are drawn for the batch's (B, R) shape: draw that, keep our rows
        n_rows, r = len(rows) * w, valid_B_R.shape[1]
        R = int(_all_reduce([r], dist.ReduceOp.MAX)[0])
        whole_valid, whole_mask = (torch.zeros((n_rows, R), dtype=torch.bool) for _ in range(2))
        whole_valid[rows.start : rows.stop, :r] = valid_B_R.cpu()
        whole_mask[rows.start : rows.stop, :r] = response_mask_B_R.cpu()
        whole = select_for_step(cfg, whole_valid, whole_mask, seed, scores)
        weight = None if whole.weight_B_R is None else whole.weight_B_R[rows.start : rows.stop, :r]
        local = Selection(whole.select_B_R[rows.start : rows.stop, :r].to(valid_B_R.device), weight, 0.0, scores)
    else:
        local = select_for_step(cfg, valid_B_R, response_mask_B_R, seed, scores)
    mine = (float(local.select_B_R.sum()) if local.weight_B_R is None
            else float(local.weight_B_R[local.select_B_R.to(local.weight_B_R.device)].sum()))
    total = _all_reduce([mine])[0]
    n_total = max(1, round(total)) if local.weight_B_R is None else max(1.0, total)
    return dataclasses.replace(local, n_total=n_total)


def sync_gradients(params: Sequence[nn.Parameter], finite: bool) -> bool:
    """Sum every parameter's gradient over the processes, in place (module docstring, 3); return whether the loss
    was finite in every process. A gradient that is None everywhere stays None (AdamW skips such a parameter, and
    must do so in every process alike); None in some processes counts as zeros."""
    if world_size() == 1:
        return finite
    device = _device()
    params = [p for p in params if not is_sharded(p)]  # FSDP already summed the sharded layers' (fsdp.py)
    flags = torch.tensor([p.grad is not None for p in params] + [not finite], dtype=torch.float32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    has_grad, any_nonfinite = flags[:-1].bool().tolist(), bool(flags[-1])
    grads = []
    for p, has in zip(params, has_grad, strict=True):
        if has:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket]).to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    return not any_nonfinite


def clip_gradients(params: Sequence[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so their global L2 norm is at most ``max_norm``; return the norm before clipping.

        norm^2 = sum over whole parameters |g|^2  +  sum over processes of sum over shards |g_shard|^2

    A whole (replicated) parameter counts once; a sharded one (FSDP) through its shards. Without shards this is
    ``torch.nn.utils.clip_grad_norm_``."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_sharded(g) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    # Per-tensor norms as torch computes them (in the gradient's dtype), so whole tensors round as in one process;
    # summed on the device, one host sync for the lot.
    def sum_sq(tensors: list[torch.Tensor]) -> torch.Tensor:
        if not tensors:
            return torch.zeros((), dtype=torch.float64, device=_device())
        return torch.stack([torch.linalg.vector_norm(t).double().to(_device()) for t in tensors]).pow(2).sum()

    sq = sum_sq([g.to_local() for g in grads if is_sharded(g)])
    dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    norm = float((sq + sum_sq([g for g in grads if not is_sharded(g)])).sqrt())
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        for g in grads:
            (g.to_local() if is_sharded(g) else g).mul_(scale)
    return norm


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive gradients of one dtype and device, at most BUCKET_ELEMENTS each (a larger one alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        same_kind = out and out[-1][0].dtype == g.dtype and out[-1][0].device == g.device
        if same_kind and size + g.numel() <= BUCKET_ELEMENTS:
            out[-1].append(g)
            size += g.numel()
        else:
            out.append([g])
            size = g.numel()
    return out


SUMMED = ("loss", "tokens_generated", "tokens_scored", "teacher_sampled")
ROW_MEAN = ("response_len_mean", "cut_share", "repeated_4gram_share", "multi_box_share")
LARGEST = ("response_len_max", "peak_mem_gb")


def merge_metrics(m: StepMetrics) -> StepMetrics:
    """One StepMetrics for the whole batch from every process's (module docstring, 4). Fields named here or by
    prefix (``seconds_*``: the slowest process; ``flops_*``, ``tokens_*``: summed) are combined; any other field
    (step, horizon, grad norm, lr: the same in every process) is rank 0's."""
    if world_size() == 1:
        return m
    rows: list[dict[str, Any]] = [None] * world_size()  # type: ignore[list-item]
    dist.all_gather_object(rows, dataclasses.asdict(m))
    out = dict(rows[0])
    for key in out:
        values = [r[key] for r in rows]
        if key in SUMMED or key.startswith(("flops_", "tokens_")):
            out[key] = sum(values)
        elif key in LARGEST or key.startswith("seconds_"):
            out[key] = max(values)
        elif key in ROW_MEAN:  # every process holds the same number of rows
            out[key] = sum(values) / len(values)
        elif key == "skipped":
            out[key] = any(values)
    kl_sum = sum(r["kl"] * max(1, r["tokens_scored"]) for r in rows)
    out["kl"] = kl_sum / max(1, out["tokens_scored"])
    out["trained_share"] = out["tokens_scored"] / max(1, out["tokens_generated"])
    t_sum = sum((r["kl_teacher_sampled"] or 0.0) * r["tokens_teacher_sampled"] for r in rows)
    out["kl_teacher_sampled"] = t_sum / out["tokens_teacher_sampled"] if out["tokens_teacher_sampled"] else None
    distinct = [r["distinct_share"] for r in rows if r["distinct_share"] is not None]  # each process's own groups
    out["distinct_share"] = sum(distinct) / len(distinct) if distinct else None
    return StepMetrics(**out)


class NullLog(MetricsLog):
    """The metrics log of a process other than rank 0: writes nothing (rank 0 writes metrics.jsonl), keeps the
    rows it was given so ``read`` still returns this run's metrics."""

    def __init__(self, run_dir: Path) -> None:
        self.path, self.trackers, self.rows, self.logged_through = run_dir / "metrics.jsonl", [], [], 0

    def truncate_after(self, step: int) -> None:
        pass

    def write(self, metrics: StepMetrics) -> None:
        self.rows.append(dataclasses.asdict(metrics))

    def scalars(self, prefix: str, step: int, values: dict[str, Any]) -> None:
        pass

    def table(self, step: int, rows: list[dict[str, Any]]) -> None:
        pass

    def read(self) -> list[dict[str, Any]]:
        return list(self.rows)
