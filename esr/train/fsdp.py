"""FSDP (``train.fsdp=true``): the decoder layers of both models sharded over the processes, ZeRO-3 style.

With several processes (torchrun / ``accelerate launch --multi_gpu``; ``esr.train.distributed``) each process
normally holds the whole student and teacher and only the batch is split. With ``train.fsdp=true`` every decoder
layer of the student and of the teacher is ``fully_shard``-ed (PyTorch FSDP2) over all processes: a process keeps
1/W of each layer's weights (and of the student's gradients and AdamW moments), and a layer's weights are gathered
just for its forward and backward. The embeddings, the final norm and the output head stay whole in every process:
esr's step runs the decoder and the head separately (``esr.models.forward``), never the root module's forward, and
FSDP2 sharding the root breaks on that (``benchmarks/fsdp_cpu_probe.py``). The layers hold most of a model's
weights (Qwen2.5-7B: 6.5 of 7.6 B parameters).

Gradients. Each process's loss is its rows' share of the batch mean, so the batch's gradient is the SUM over
processes: the layers' gradients are reduce-scattered as a sum (divide factor 1, sum-only collectives, which gloo
supports), the whole parameters' gradients are summed by ``distributed.sync_gradients``, and the norm for clipping
adds each process's shard norms once (``distributed.clip_gradients``). The result equals one process's step to
floating-point rounding (tests/train/test_distributed.py).

Generation calls a sharded layer in every process at once, so ``generate`` runs with ``synced_gpus``: a process
whose rows have all stopped keeps stepping (without sampling) until every process's rows have.

Checkpoints keep the one-process format (the same files and keys as an unsharded run's), so ``esr eval`` and
``load_model`` read them as they are: every process gathers full tensors (``full_state_dict``,
``full_optimizer_state``: collectives) and rank 0 writes them. A resume loads the weights before sharding and hands
each process its shards of the optimizer state (``shard_optimizer_state``).

Tested with 2 CPU processes on gloo (tests/train/test_distributed.py); the nccl/GPU path is the same code with a
CUDA device mesh, not yet run on GPUs.

Not with FSDP, refused at startup (``check_fsdp``): evaluation during training (rank 0 alone would call sharded
layers; evaluate the checkpoints afterwards with ``esr eval RUN``) and EffOPD extrapolation (its line search and
host-memory backups would need the same collective treatment). Gradient checkpointing runs (tested).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from esr.config import Config, ConfigError

if TYPE_CHECKING:
    from esr.train.session import Session

FSDP_REFUSED = {
    "eval.every": lambda cfg: cfg.eval.every > 0,
    "optim.extrapolate.enabled": lambda cfg: cfg.optim.extrapolate.enabled,
}
"""Settings that do not run with train.fsdp=true (module docstring): name -> whether ``cfg`` asks for it."""


def check_fsdp(cfg: Config, world: int) -> None:
    """Reject train.fsdp=true where it cannot run, before anything loads."""
    if not cfg.train.fsdp:
        return
    if world < 2:
        raise ConfigError("train.fsdp=true shards the models over several processes, but this run has one: launch "
                          "it with `torchrun --nproc_per_node N -m esr train ...` (or `accelerate launch "
                          "--multi_gpu`), or drop train.fsdp")
    asked = [name for name, on in FSDP_REFUSED.items() if on(cfg)]
    if asked:
        raise ConfigError(f"train.fsdp=true does not run with {', '.join(asked)} (esr/train/fsdp.py): turn "
                          f"{'it' if len(asked) == 1 else 'them'} off; evaluate checkpoints afterwards with "
                          "`esr eval RUN`")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (``model.model.layers`` in HF causal LMs, under PEFT's wrapper too)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError(f"train.fsdp=true needs a decoder with a `layers` list; {type(model).__name__} has none")
    return layers


def shard(model: nn.Module, device: torch.device) -> None:
    """``fully_shard`` every decoder layer of ``model`` over all processes, with sum-reduced gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
        layer.set_gradient_divide_factor(1.0)  # the batch's gradient is the processes' sum (module docstring)
        layer.set_force_sum_reduction_for_comms(True)  # no PREMUL_SUM: gloo has none


def shard_session(s: Session, cfg: Config) -> Session:
    """Shard the session's student and teacher layers; a new optimizer over the sharded parameters; synced
    sampling. The student holds its final starting weights already (a resumed run's checkpoint is loaded first)."""
    from esr.train.session import make_optimizer

    shard(s.student, s.device)
    if s.teacher is not None:  # a remote teacher (teacher.url) is not ours to shard
        shard(s.teacher, s.device)
    optimizer, scheduler = make_optimizer(s.student, cfg)
    s.sampler.synced = True
    s.info["fsdp"] = {"processes": dist.get_world_size(), "sharded": "decoder layers of student and teacher",
                      "student_params_here": local_numel(s.student),
                      **({"teacher_params_here": local_numel(s.teacher)} if s.teacher is not None else {})}
    return dataclasses.replace(s, optimizer=optimizer, scheduler=scheduler)


def local_numel(model: nn.Module) -> int:
    """Parameter elements this process holds: its shards of the sharded ones, all of the others."""
    return sum(p.to_local().numel() if is_sharded(p) else p.numel() for p in model.parameters())


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_state_dict(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Every (or every trainable) parameter of ``model`` as a whole CPU tensor, under its ``named_parameters``
    name. A collective: every process must call it, in the same order."""
    out = {}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        full = p.full_tensor() if is_sharded(p) else p.detach()
        out[name] = full.cpu().clone()
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole (the one-process format).
    A collective: every process holds state for the same parameters (their gradients are synced)."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: (v.full_tensor().cpu() if is_sharded(v) else v) for k, v in s.items()}
                   for i, s in sd["state"].items()}
    return sd


def shard_optimizer_state(sd: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A one-process optimizer state dict with each sharded parameter's state tensors cut to this process's
    shards (the inverse of ``full_optimizer_state``); ready for ``optimizer.load_state_dict``."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: (distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                        if is_sharded(p) and torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) else v)
                    for k, v in s.items()}
    return {**sd, "state": state}
