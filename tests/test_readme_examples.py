"""Every example command in the README runs, offline, as written but on tiny models.

``EXAMPLES`` maps each command line of the README's ``bash`` blocks (its trailing comment dropped) to how this test
runs it: a list of (README text, replacement) pairs that make it small -- tiny presets of the same tokenizer family
for zoo models, ``configs/smoke.yaml``'s tiny models for a config's pair, a few problems and tokens -- or a ``Skip``
saying why it cannot run here. ``test_every_readme_command_is_covered`` fails when the README gains a command this
table does not know, so an example cannot go untested by accident. Run folders (``runs/<run>``) are made by the
README's own training lines first, in a temporary working directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("needs_smollm2_package")]

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


@dataclass(frozen=True)
class Skip:
    why: str


# Overrides that shrink a config's pair and run to the smoke size (tiny models, a few tokens).
SMOKE_TRAIN = "train.steps=2 train.batch_size=2 train.micro_batch_size=1 train.checkpoint_every=1 data.size=8 " \
              "rollout.n=8 rollout.max_new_tokens=12 lora.r=4 lora.alpha=8"
QUICKSTART_TINY = f"student.name=tiny-student teacher.name=tiny-teacher {SMOKE_TRAIN}"
XFAMILY_TINY = f"student.name=tiny-student teacher.name=tiny-teacher-qwen {SMOKE_TRAIN}"
FEW = "--limit 2 --max-new-tokens 12 --no-progress"

SERVER_TESTED = ("tests/rollout/test_vllm_server.py starts this very server command (tiny-qwen, --enable-lora, "
                 "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1) and trains through it with rollout.engine=vllm-server; a second "
                 "server here would add ~40 s to the suite")

EXAMPLES: dict[str, list[tuple[str, str]] | Skip] = {
    # training: the run folders the later lines read
    "esr train configs/quickstart.yaml optim.extrapolate.enabled=true":
        [("enabled=true", f"enabled=true optim.extrapolate.probe_size=2 {QUICKSTART_TINY} --out runs/esr-run")],
    "esr train configs/quickstart-xfamily.yaml": [(".yaml", f".yaml {XFAMILY_TINY} --out runs/xfamily")],
    "esr train configs/mix.yaml": [(".yaml", ".yaml 'data.mix=[{name: a}, {name: b, teacher: {name: tiny-teacher}}]' "
                                              f"{XFAMILY_TINY} --out runs/mix")],
    "esr train configs/function-calling.yaml": [(".yaml", f".yaml student.name=tiny-qwen teacher.name=tiny-qwen "
                                                          f"{SMOKE_TRAIN} eval.every=1 eval.limit=2 "
                                                          f"eval.max_new_tokens=8 --out runs/function-calling")],
    "esr train configs/quickstart.yaml rollout.horizon=auto": Skip(
        "tests/train/test_auto_horizon_run.py trains rollout.horizon=auto on the smoke models (probes every step, "
        "cross-tokenizer too), resumes it bit-exactly and reports it; another trained run here would add ~40 s"),
    "esr train configs/xfamily-gemma.yaml": Skip(
        "Gemma-3-270M (a 262k vocabulary) as the student takes minutes a step on 2 CPU cores even at 12 tokens (600 s "
        "timed out under load); the quickstart-xfamily line runs the same cross-tokenizer path, and Gemma's tokenizer "
        "is aligned against Qwen's and SmolLM2's in tests/teacher"),
    "WANDB_MODE=offline esr train configs/quickstart.yaml 'log.trackers=[wandb,mlflow]' log.samples_every=10": Skip(
        "tests/train/test_trackers.py runs this with all four trackers on the smoke models (log.samples_every=2, "
        "eval.every=2), reads each tracker's files back and resumes it; another trained run here would add ~40 s"),
    # rollouts on vLLM (tiny-qwen: vLLM's CPU attention needs head size >= 32)
    'pip install -e ".[vllm]" && pip uninstall -y torchvision torchaudio torchcodec':
        Skip("an install line: README command 2 installs [vllm] and removes the same three packages"),
    "esr train configs/quickstart.yaml rollout.engine=vllm rollout.dtype=bfloat16":
        [("bfloat16", f"bfloat16 student.name=tiny-qwen teacher.name=tiny-teacher-qwen {SMOKE_TRAIN} --out runs/vllm")],
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 python -m vllm.entrypoints.openai.api_server --model STUDENT_BASE "
    "--enable-lora --max-lora-rank R --port 8000": Skip(SERVER_TESTED),
    "esr train configs/quickstart.yaml rollout.engine=vllm-server rollout.vllm.url=http://SAMPLER_HOST:8000":
        Skip(SERVER_TESTED),
    # evaluation
    "esr eval qwen2.5-coder-0.5b-instruct --task gsm_symbolic --limit 100":
        [("qwen2.5-coder-0.5b-instruct", "tiny-teacher-qwen"), ("--limit 100", FEW)],
    "esr eval runs/quickstart-... --task math500 --path data/math500/test.jsonl --n 4 --temperature 0.7":
        [("runs/quickstart-...", "runs/esr-run"), ("data/math500/test.jsonl", "math500.jsonl"), ("0.7", f"0.7 {FEW}")],
    "esr eval smollm2-135m-instruct --task humaneval": [("smollm2-135m-instruct", "tiny-student"), ("humaneval",
                                                                                                   f"humaneval {FEW}")],
    "esr eval qwen2.5-coder-0.5b-instruct --task bfcl:simple":
        [("qwen2.5-coder-0.5b-instruct", "tiny-teacher-qwen"), ("bfcl:simple", f"bfcl:simple {FEW}")],
    # diagnostics
    "esr probe kl-profile configs/quickstart.yaml --rollouts 8 --max-new-tokens 256":
        [("quickstart.yaml", "smoke.yaml"), ("--rollouts 8 --max-new-tokens 256", "--rollouts 2 --max-new-tokens 12 "
                                                                                  "--no-progress")],
    "esr probe decay configs/quickstart.yaml --ks 0 25 50 100 --limit 8":
        [("quickstart.yaml", "smoke.yaml"), ("--ks 0 25 50 100 --limit 8", "--ks 0 4 8 " + FEW)],
    "esr analyze cascade runs/<run>": [("runs/<run>", "runs/esr-run --rollouts 2 --max-new-tokens 12 --no-progress")],
    "esr probe heldout-kl runs/<run> --base --prompts 128":
        [("runs/<run>", "runs/esr-run"), ("--prompts 128", "--prompts 2 --max-new-tokens 12 --no-progress")],
    "esr report runs/<esr-run> runs/<full-run>": [("<esr-run>", "esr-run"), ("<full-run>", "xfamily")],
    "esr export runs/<run> --out models/my-student --merge --dtype bfloat16": [("runs/<run>", "runs/esr-run")],
    # the teacher as a service (a real server on 127.0.0.1, a free port)
    'pip install -e ".[serve]"': Skip("an install line: the [test] extra includes [serve]"),
    "ESR_TEACHER_TOKEN=s3cret esr serve-teacher qwen2.5-coder-1.5b-instruct --port 8000":
        [("qwen2.5-coder-1.5b-instruct", "tiny-teacher")],
    'curl -s -H "Authorization: Bearer s3cret" localhost:8000/v1/score -d \'{"sequences": [[9707, 11, 1879]], '
    '"start": 1, "top_k": 5}\'': [],
    "ESR_TEACHER_TOKEN=s3cret esr serve-teacher qwen2.5-coder-1.5b-instruct --host 0.0.0.0 --port 8000":
        Skip("binds every interface; tests bind loopback only (the --port 8000 line above is the same server)"),
    "ESR_TEACHER_TOKEN=s3cret esr train configs/quickstart.yaml teacher.url=http://TEACHER_HOST:8000 loss.kind=sampled":
        [("TEACHER_HOST", "127.0.0.1"), ("sampled", f"sampled {QUICKSTART_TINY} --out runs/remote")],
    # several processes
    "torchrun --standalone --nproc_per_node 2 -m esr train configs/quickstart.yaml --out runs/two":
        [("quickstart.yaml", f"quickstart.yaml {QUICKSTART_TINY}")],
    "accelerate launch --multi_gpu --num_processes 2 -m esr train configs/quickstart.yaml --out runs/two":
        [("quickstart.yaml", f"quickstart.yaml {QUICKSTART_TINY}"), ("runs/two", "runs/two-accelerate")],
    "torchrun --standalone --nproc_per_node 2 -m esr train --resume runs/two": [],
    "torchrun --standalone --nproc_per_node 8 -m esr train configs/paper/qwen-math-esr-fullft.yaml train.fsdp=true":
        Skip("the paper's Qwen2.5-Math models from the hub on 8 processes; train.fsdp=true on 2 processes is "
             "tests/train/test_distributed.py::test_fsdp_shards_the_layers_and_trains_what_one_process_trains"),
}


def readme_commands() -> list[str]:
    """Each command line of the README's bash blocks, without its comment; not the two set-up commands
    (.ci/run runs those, tests/test_readme.py checks it)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "pip install torch=="))]


def test_every_readme_command_is_covered():
    commands = readme_commands()
    unknown = [c for c in commands if c not in EXAMPLES]
    assert not unknown, f"README commands this test does not run or skip (add them to EXAMPLES): {unknown}"
    stale = [c for c in EXAMPLES if c not in commands]
    assert not stale, f"EXAMPLES lists commands the README no longer has: {stale}"


def offline(command: str, port: int) -> str:
    """The README command with its substitutions, the configs by absolute path and the server on ``port``."""
    rules = EXAMPLES[command]
    assert not isinstance(rules, Skip)
    for old, new in rules:
        assert old in command, (old, command)
        command = command.replace(old, new, 1)
    return command.replace("configs/", f"{REPO}/configs/").replace(":8000", f":{port}").replace("--port 8000",
                                                                                                 f"--port {port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command line as a shell would (``VAR=value`` prefixes included), ``esr`` meaning this checkout's."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    argv = shlex.split(command)
    while "=" in argv[0] and not argv[0].startswith("-"):
        key, _, value = argv.pop(0).partition("=")
        env[key] = value
    if argv[0] == "esr":
        argv = [sys.executable, "-m", "esr", *argv[1:]]
    elif argv[0] == "accelerate":  # the same launcher; its default-config notice asks nothing
        argv = [sys.executable, "-m", "accelerate.commands.launch", *argv[2:]]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def check(command: str, done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    rows = [{"problem": "What is $1+1$?", "answer": "2"}, {"problem": "What is $2 \\cdot 3$?", "answer": "6"}]
    (folder / "math500.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.fixture(scope="module")
def teacher_server(workdir: Path):
    """The README's `esr serve-teacher` line, as a real process on a free loopback port."""
    pytest.importorskip("uvicorn", reason="the [serve] extra: pip install -e '.[serve]'")
    port = free_port()
    line = "ESR_TEACHER_TOKEN=s3cret esr serve-teacher qwen2.5-coder-1.5b-instruct --port 8000"
    argv = shlex.split(offline(line, port))
    env = dict(os.environ, ESR_TEACHER_TOKEN="s3cret", PYTHONPATH=str(REPO))
    server = subprocess.Popen([sys.executable, "-m", "esr", *argv[2:]], cwd=workdir, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, f"{line} exited: {server.stdout.read()[-3000:]}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"{line} did not listen on {port} within 120 s")
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


ORDER = [  # the README's lines, in an order where each run folder exists before a line reads it
    "esr train configs/quickstart.yaml optim.extrapolate.enabled=true",
    "esr train configs/quickstart-xfamily.yaml",
    "esr train configs/function-calling.yaml",
    "esr train configs/mix.yaml",
    "esr train configs/quickstart.yaml rollout.engine=vllm rollout.dtype=bfloat16",
    "esr eval qwen2.5-coder-0.5b-instruct --task gsm_symbolic --limit 100",
    "esr eval runs/quickstart-... --task math500 --path data/math500/test.jsonl --n 4 --temperature 0.7",
    "esr eval smollm2-135m-instruct --task humaneval",
    "esr eval qwen2.5-coder-0.5b-instruct --task bfcl:simple",
    "esr probe kl-profile configs/quickstart.yaml --rollouts 8 --max-new-tokens 256",
    "esr probe decay configs/quickstart.yaml --ks 0 25 50 100 --limit 8",
    "esr analyze cascade runs/<run>",
    "esr probe heldout-kl runs/<run> --base --prompts 128",
    "esr report runs/<esr-run> runs/<full-run>",
    "esr export runs/<run> --out models/my-student --merge --dtype bfloat16",
    "torchrun --standalone --nproc_per_node 2 -m esr train configs/quickstart.yaml --out runs/two",
    "torchrun --standalone --nproc_per_node 2 -m esr train --resume runs/two",
    "accelerate launch --multi_gpu --num_processes 2 -m esr train configs/quickstart.yaml --out runs/two",
]


def test_order_covers_every_runnable_local_example():
    local = {c for c, rules in EXAMPLES.items() if not isinstance(rules, Skip) and "8000" not in c}
    assert set(ORDER) == local and len(ORDER) == len(local)


@pytest.mark.parametrize("command", ORDER)
def test_readme_example_runs(command: str, workdir: Path):
    if "engine=vllm" in command:
        pytest.importorskip("vllm", reason="the [vllm] extra: pip install -e '.[vllm]'")
    line = offline(command, port=0)
    check(line, run(line, workdir))
    if command.startswith("esr train"):
        out = workdir / line.split("--out ")[1].split()[0]
        assert (out / "checkpoints").is_dir() and (out / "metrics.jsonl").read_text().count("\n") == 2


def test_readme_teacher_service_examples(teacher_server: int, workdir: Path):
    """`esr serve-teacher`, the README's curl against it, and training with it as a remote teacher."""
    curl = next(c for c in EXAMPLES if c.startswith("curl"))
    done = run(offline(curl, teacher_server), workdir, timeout=60)
    check(curl, done)
    scored = json.loads(done.stdout)
    assert len(scored["logprobs"][0]) == 2 and len(scored["top_logprobs"][0][0]) == 5, scored
    remote = next(c for c in EXAMPLES if "teacher.url" in c)
    check(remote, run(offline(remote, teacher_server), workdir))


def test_readme_library_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """The README's Python block, on the tiny pair."""
    code = re.search(r"## Library\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    for old, new in [("configs/quickstart.yaml", str(REPO / "configs/quickstart.yaml")),
                     ('"train.steps=20"', ", ".join(f'"{o}"' for o in QUICKSTART_TINY.split())),
                     ('"runs/my-run"', f'"{tmp_path / "my-run"}"')]:
        assert old in code
        code = code.replace(old, new)
    exec(compile(code, "README.md (Library)", "exec"), {})
    printed = capsys.readouterr().out.split()
    assert float(printed[0]) > 0 and printed[1].endswith("step-000002")


def test_readme_jsonl_task_takes_question_rows(workdir: Path):
    """README, Evaluation: `--task jsonl` reads rows with `question`/`problem`/`prompt` and `answer`."""
    rows = [{"question": "What is 2 + 2?", "answer": "4"}, {"problem": "What is $3 \\cdot 3$?", "answer": "9"},
            {"prompt": "What is 1 + 0?", "answer": "1"}]
    (workdir / "mine.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    line = f"esr eval tiny-student --task jsonl --path mine.jsonl --out eval-mine {FEW}"
    check(line, run(line, workdir))
    summary = json.loads((workdir / "eval-mine" / "summary.json").read_text())
    assert summary["n_problems"] == 2, summary
