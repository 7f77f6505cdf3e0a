"""Real disk and memory faults in a child process: a checkpoint write that hits the file-size limit (EFBIG, what a
full disk looks like to the writer) and a step that runs out of address space. Both must end in one clear line
(exit code 2) that says where and why, keep the previous checkpoint intact, and leave a folder that resumes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from esr.train.checkpoint import latest_checkpoint

ROOT = Path(__file__).parents[2]

FILE_SIZE_CHILD = textwrap.dedent('''
    import resource, signal, sys
    import esr.train.loop as loop

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails with EFBIG instead of killing
    real = loop.save_checkpoint

    def save_then_fill_the_disk(run_dir, step, *args, **kwargs):
        out = real(run_dir, step, *args, **kwargs)
        if step >= 2:  # after the run's first checkpoint (the collapse guard's copy of step 0 comes before it)
            resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))  # metrics lines still fit
        return out

    loop.save_checkpoint = save_then_fill_the_disk
    from esr.cli import main
    sys.exit(main(["train", "configs/smoke.yaml", "train.steps=4", "train.checkpoint_every=2", "--out", sys.argv[1],
                   "--no-progress"]))
''')

ADDRESS_SPACE_CHILD = textwrap.dedent('''
    import resource, sys
    import esr.train.loop as loop

    real = loop.run_step

    def step_with_little_memory_left(*args, **kwargs):
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + 64 * 2**20, resource.RLIM_INFINITY))
        return real(*args, **kwargs)

    loop.run_step = step_with_little_memory_left
    from esr.cli import main
    sys.exit(main(["train", "configs/smoke.yaml", "train.steps=2", "rollout.n=512", "rollout.max_new_tokens=512",
                   "rollout.min_new_tokens=512", "loss.chunk_size=512", "--out", sys.argv[1], "--no-progress"]))
''')


def _run(child: str, run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", child, str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, needs_smollm2_package):
    run = tmp_path / "r"
    out = _run(FILE_SIZE_CHILD, run)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "could not write checkpoint" in out.stderr and "step-000004" in out.stderr
    assert "File too large" in out.stderr and "step-000002 is intact" in out.stderr
    assert "esr train --resume" in out.stderr
    assert latest_checkpoint(run).name == "step-000002"
    assert not list((run / "checkpoints").glob("*.tmp-*"))  # nothing half-written is left behind
    torch.load(run / "checkpoints" / "step-000002" / "trainer" / "trainer_state.pt", weights_only=True)

    resumed = subprocess.run([sys.executable, "-m", "esr.cli", "train", "--resume", str(run), "--no-progress"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_out_of_memory_in_a_step_names_the_settings_to_lower(tmp_path, needs_smollm2_package):
    out = _run(ADDRESS_SPACE_CHILD, tmp_path / "r")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "out of memory in step 1" in out.stderr
    for setting in ("train.micro_batch_size", "loss.chunk_size (now 512)", "rollout.n=512",
                    "train.gradient_checkpointing=true"):
        assert setting in out.stderr, setting
