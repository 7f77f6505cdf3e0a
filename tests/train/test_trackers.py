"""log.trackers: one real 3-step smoke run logs to TensorBoard, wandb (offline), trackio (local store) and MLflow
(sqlite in the run folder) at once; each tracker's own reader gives back the config, every step's metrics (equal to
metrics.jsonl), the evaluation's numbers and the samples table (equal to samples.jsonl). Then the run is resumed
from an older checkpoint and extended: every tracker continues its run, and no step reaches a tracker twice."""

from __future__ import annotations

import glob
import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from esr_process import REPO, esr_env, run_esr

from esr.config import ConfigError, load_config
from esr.train import train
from esr.train.trackers import check_trackers

TRACKERS = "log.trackers=[tensorboard,wandb,trackio,mlflow]"
SMOKE = str(REPO / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 3-step run (checkpoints at 2 and 3, evaluation and samples table at step 2), then the crash case: the
    step-3 checkpoint is gone, so a resume extended to 4 steps redoes step 3 (already in every tracker) and adds 4."""
    tmp = tmp_path_factory.mktemp("trackers")
    env = esr_env(WANDB_MODE="offline", WANDB_SILENT="true", TRACKIO_DIR=str(tmp / "trackio"),
                  MLFLOW_TRACKING_URI="")
    run = tmp / "run"
    first = run_esr("train", SMOKE, TRACKERS, "log.samples_every=2", "eval.every=2", "eval.limit=2",
                    "eval.max_new_tokens=8", "rollout.n=8", "rollout.max_new_tokens=8", "--out", run, "--no-progress",
                    env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    first_rows = _jsonl(run / "metrics.jsonl")
    shutil.rmtree(run / "checkpoints" / "step-000003")
    second = run_esr("train", "--resume", run, "train.steps=4", "--no-progress", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"run": run, "trackio": tmp / "trackio", "first": first_rows, "metrics": _jsonl(run / "metrics.jsonl"),
            "samples": _jsonl(run / "samples.jsonl"), "eval": _jsonl(run / "eval" / "history.jsonl")}


def test_the_run_folder_has_the_samples_table_and_the_trackers_run_ids(logged: dict[str, Any]):
    samples, metrics = logged["samples"], {row["step"]: row for row in logged["metrics"]}
    assert [row["step"] for row in samples] == [2, 2, 2, 2, 4, 4, 4, 4]  # log.samples=4 rows every 2 steps
    assert all(set(row) == {"step", "prompt", "response", "length", "kl", "cut"} for row in samples)
    assert all("Give the result" in row["prompt"] and row["response"] for row in samples)
    for step in (2, 4):  # loss.select=all: the length-weighted mean of the rows' KL is the step's KL metric
        rows = [row for row in samples if row["step"] == step]
        assert sum(row["length"] for row in rows) == metrics[step]["tokens_generated"]
        weighted = sum(row["kl"] * row["length"] for row in rows) / sum(row["length"] for row in rows)
        assert weighted == pytest.approx(metrics[step]["kl"], rel=1e-5)
    state = json.loads((logged["run"] / "trackers.json").read_text())
    assert set(state) == {"wandb", "trackio", "mlflow"} and state["wandb"]["mode"] == "offline"
    assert [row["step"] for row in logged["metrics"]] == [1, 2, 3, 4]
    same = ("loss", "kl", "grad_norm", "tokens_generated")  # resume is bit-exact: the redone step 3 is the first one
    assert [[row[k] for k in same] for row in logged["metrics"][:3]] == [[row[k] for k in same]
                                                                          for row in logged["first"]]


def test_tensorboard(logged: dict[str, Any]):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged["run"] / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    _same([(e.step, e.value) for e in events.Scalars("train/kl")], _series(logged, "kl"))
    _same([(e.step, e.value) for e in events.Scalars("eval/accuracy")], _evals(logged))
    texts = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]
             for tag in ("config/text_summary", "samples/text_summary")}
    assert "train.steps: 3" in texts["config/text_summary"][0][1]
    assert [step for step, _ in texts["samples/text_summary"]] == [2, 4]
    first = logged["samples"][0]["response"].replace("|", "\\|").replace("\n", " ")
    assert first in texts["samples/text_summary"][0][1]


def test_wandb_offline_files(logged: dict[str, Any]):
    runs = sorted(glob.glob(str(logged["run"] / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and len({Path(r).name.split("-")[-1] for r in runs}) == 1  # the resume kept the run id
    config, history = {}, []
    for folder in runs:
        c, h = _wandb_records(next(Path(folder).glob("run-*.wandb")))
        config.update(c)
        history += h
    assert config["train"]["steps"] == 4 and config["log"]["samples_every"] == 2  # the resume's, extended
    _same([(h["_step"], h["train/kl"]) for h in history if "train/kl" in h], _series(logged, "kl"))
    _same([(h["_step"], h["eval/accuracy"]) for h in history if "eval/accuracy" in h], _evals(logged))
    tables = [(h["_step"], h["samples"]) for h in history if "samples" in h]
    assert [step for step, _ in tables] == [2, 4]
    for (step, table), folder in zip(tables, runs, strict=True):
        data = json.loads((Path(folder) / "files" / table["path"]).read_text())
        assert data["columns"] == ["prompt", "response", "length", "kl", "cut"]
        assert data["data"] == [[r[c] for c in data["columns"]] for r in logged["samples"] if r["step"] == step]


def test_trackio_local_store(logged: dict[str, Any]):
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps([S.get_run_config('smoke', 'run'), S.get_logs('smoke', 'run')]))")
    import subprocess  # trackio reads TRACKIO_DIR when imported: read back in a process that has it

    out = subprocess.run([sys.executable, "-c", code], env=esr_env(TRACKIO_DIR=str(logged["trackio"])),
                         capture_output=True, text=True, check=True).stdout
    config, logs = json.loads(out.strip().splitlines()[-1])
    assert config["train"]["steps"] == 4 and config["log"]["trackers"] == ["tensorboard", "wandb", "trackio", "mlflow"]
    _same([(r["step"], r["train/kl"]) for r in logs if "train/kl" in r], _series(logged, "kl"))
    _same([(r["step"], r["eval/accuracy"]) for r in logs if "eval/accuracy" in r], _evals(logged))
    tables = [(r["step"], r["samples"]["_value"]) for r in logs if "samples" in r]
    assert tables == [(step, [{k: v for k, v in r.items() if k != "step"} for r in logged["samples"]
                              if r["step"] == step]) for step in (2, 4)]


def test_mlflow_sqlite_store(logged: dict[str, Any]):
    from mlflow import MlflowClient

    state = json.loads((logged["run"] / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(state["tracking_uri"])
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == "3"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the resume continued the same run
    history = client.get_metric_history(state["run_id"], "train/kl")
    _same(sorted((m.step, m.value) for m in history), _series(logged, "kl"))
    evals = client.get_metric_history(state["run_id"], "eval/accuracy")
    _same(sorted((m.step, m.value) for m in evals), _evals(logged))
    assert "eval/pass_1" in run.data.metrics  # eval/pass@1, in the characters MLflow allows
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(logged["run"].resolve())
    for step in (2, 4):
        path = Path(client.download_artifacts(state["run_id"], f"samples/step-{step:06d}.json",
                                              str(logged["run"] / "download")))
        table = json.loads(path.read_text())  # pandas' JSON: floats to 10 significant digits
        rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
        expected = [{k: v for k, v in r.items() if k != "step"} for r in logged["samples"] if r["step"] == step]
        assert [{**r, "kl": None} for r in rows] == [{**r, "kl": None} for r in expected]
        assert [r["kl"] for r in rows] == pytest.approx([r["kl"] for r in expected], rel=1e-8)


def test_a_tracker_name_is_checked_with_a_suggestion():
    with pytest.raises(ConfigError, match="Did you mean 'wandb'"):
        load_config(SMOKE, ["log.trackers=[wanb]"])
    assert load_config(SMOKE, ["log.trackers=mlflow"]).log.trackers == ("mlflow",)
    assert load_config(SMOKE, ["log.trackers=[]"]).log.trackers == ()


def test_a_missing_tracker_library_names_its_extra_before_any_model_loads(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib finds no wandb
    cfg = load_config(SMOKE, ["log.trackers=[tensorboard,wandb]", "student.name=no-such-model"])
    with pytest.raises(ConfigError, match=r'pip install "esr-distill\[wandb\]"'):
        check_trackers(cfg)
    with pytest.raises(ConfigError, match="wandb is not installed"):  # not the unknown model: nothing loaded
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def _same(pairs: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    """(step, value) pairs: the same steps, each once, with the same values (to float32 rounding)."""
    assert [step for step, _ in pairs] == [step for step, _ in expected]
    assert [value for _, value in pairs] == pytest.approx([value for _, value in expected], rel=1e-6)


def _series(logged: dict[str, Any], key: str) -> list[tuple[int, float]]:
    return [(row["step"], row[key]) for row in logged["metrics"]]


def _evals(logged: dict[str, Any]) -> list[tuple[int, float]]:
    return [(row["step"], row["accuracy"]) for row in logged["eval"]]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wandb_records(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The config and history rows of a .wandb file: a 7-byte header, then LevelDB-log records (4-byte CRC, 2-byte
    length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks, each a wandb Record protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, records, part = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # the rest of a block is zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            records.append(part)
    config: dict[str, Any] = {}
    history = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update if i.key != "_wandb"})
        elif record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                keys = list(item.nested_key) or [item.key]
                node = row
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = json.loads(item.value_json)
            history.append(row)
    return config, history


def test_a_stopped_then_failed_run_ends_its_tracker_run_so_and_a_resume_skips_the_steps_it_has(tmp_path: Path):
    """MetricsLog with MLflow, in process: close("stopped") marks the run KILLED; a resume (a new MetricsLog on the
    same folder, cut back to step 1) continues the same MLflow run and sends step 2 (already there) not again."""
    from mlflow import MlflowClient

    from esr.train.metrics import MetricsLog, StepMetrics

    cfg = load_config(SMOKE, ["log.trackers=[mlflow]"])
    fields = {f: 0.0 for f in StepMetrics.__dataclass_fields__ if f not in ("step", "skipped")}
    log = MetricsLog(tmp_path, cfg)
    for step in (1, 2):
        log.write(StepMetrics(step=step, **{**fields, "kl": float(step), "horizon": 16}))
    log.close("stopped")
    state = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(state["tracking_uri"])
    assert client.get_run(state["run_id"]).info.status == "KILLED"
    resumed = MetricsLog(tmp_path, cfg)
    resumed.truncate_after(1)  # the checkpoint of step 1: step 2 is redone
    for step in (2, 3):
        resumed.write(StepMetrics(step=step, **{**fields, "kl": 10.0 * step, "horizon": 16}))
    resumed.close("failed")
    assert client.get_run(state["run_id"]).info.status == "FAILED"
    assert sorted((m.step, m.value) for m in client.get_metric_history(state["run_id"], "train/kl")) == [
        (1, 1.0), (2, 2.0), (3, 30.0)]
    assert [row["step"] for row in resumed.read()] == [1, 2, 3]


def test_a_crash_in_a_step_ends_the_tracker_run_as_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mlflow import MlflowClient

    import esr.train.loop as loop_module

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a step crashed")

    monkeypatch.setattr(loop_module, "run_step", crash)
    monkeypatch.chdir(tmp_path)  # nothing of the run lands in the working directory
    with pytest.raises(RuntimeError, match="a step crashed"):
        train(load_config(SMOKE, ["log.trackers=[mlflow]"]), tmp_path / "run", progress=False)
    state = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]
    assert MlflowClient(state["tracking_uri"]).get_run(state["run_id"]).info.status == "FAILED"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_tracker_that_cannot_start_is_one_line_that_says_what_to_check(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    from esr.train.metrics import MetricsLog
    from esr.train.trackers import TrackerError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://x")
    with pytest.raises(TrackerError, match=r"mlflow could not start \(.*\); check MLFLOW_TRACKING_URI"):
        MetricsLog(tmp_path, load_config(SMOKE, ["log.trackers=[tensorboard,mlflow]"]))
