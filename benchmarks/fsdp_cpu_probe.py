"""Why esr's FSDP mode (train.fsdp, esr/train/fsdp.py) shards the decoder layers only: FSDP2 (``fully_shard``) on
CPU/gloo with the tiny student, two processes.

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_cpu_probe.py

Each process computes esr's step on the same rows (decoder body -> hidden states detached into a leaf -> output
head -> backward from the leaf, as ``esr.train.step`` does), so FSDP's averaged gradient must equal the gradient of
an unsharded copy. Three ways to shard are tried (torch 2.13 CPU, transformers 5.24): the layers and the root
fail (mixed torch.Tensor and DTensor in the embedding), the layers and the decoder untie a tied head and get the
embedding's gradient wrong, the layers alone are exact (what esr does).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from esr.models import load_model
from esr.models.forward import head_logits, response_hidden
from esr.rollout.sampler import HFSampler


def esr_backward(model: torch.nn.Module, rollouts) -> None:
    hidden = response_hidden(model, rollouts)
    leaf = hidden.detach().requires_grad_(True)
    head_logits(model, leaf).log_softmax(-1).mean().backward()
    hidden.backward(leaf.grad)


def trial(name: str, shard_root: bool | None, mesh, rollouts, reference: dict[str, torch.Tensor]) -> str:
    """shard_root: True shards the root too, False the decoder, None nothing above the layers."""
    model, _ = load_model("tiny-student")
    model.requires_grad_(True).train()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if shard_root is not None:
        fully_shard(model if shard_root else model.model, mesh=mesh)
    try:
        esr_backward(model, rollouts)
    except Exception as e:  # noqa: BLE001
        return f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0]}"
    errors, extra = {}, []
    for n, p in model.named_parameters():
        if n not in reference:  # the unsharded model lists a tied weight once
            extra.append(n)
            continue
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        errors[n] = float((g - reference[n]).abs().max() / reference[n].abs().max())
    worst = max(errors, key=errors.get)
    untied = f"; {', '.join(extra)} is now a parameter of its own (the tie is broken)" if extra else ""
    return f"{name}: ran; worst gradient {worst}: {errors[worst]:.2e} max relative error vs one process{untied}"


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ref, tok = load_model("tiny-student")
    ref.requires_grad_(True).train()
    prompts = [tok(q).input_ids for q in ["What is 2 + 3?", "Hi there"]]
    sampler = HFSampler(ref, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, temperature=0.7)
    rollouts = sampler.sample(prompts, 6, seed=0)
    esr_backward(ref, rollouts)
    reference = {n: p.grad.clone() for n, p in ref.named_parameters()}
    lines = [trial("fully_shard(layers) + fully_shard(root)", True, mesh, rollouts, reference),
             trial("fully_shard(layers) + fully_shard(decoder)", False, mesh, rollouts, reference),
             trial("fully_shard(layers) only", None, mesh, rollouts, reference)]
    if dist.get_rank() == 0:
        print("\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
