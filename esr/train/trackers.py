"""Experiment trackers (``log.trackers``): TensorBoard, Weights & Biases, Trackio and MLflow, each through its own
library, imported only when named. ``MetricsLog`` (esr/train/metrics.py) fans every row out to them; metrics.jsonl
stays the source of truth. Rank 0 only.

Each tracker gets the config once (``log_config``: nested for wandb/trackio, flattened ``a.b.c`` params for
MLflow, a text summary for TensorBoard), scalars keyed ``train/<metric>``, ``eval/<key>``, ``extrapolate/<key>``
at their step (``log_metrics``), the samples table (``log_table``) and ``close`` with how the run ended.

Resume: the tracker run continues where the library allows. wandb gets the run id kept in ``trackers.json`` with
``resume="allow"``, MLflow the run id kept there, trackio the same project and run name with ``resume="allow"``,
TensorBoard the same tb/ folder. None of them can overwrite a logged point, so after a resume ``MetricsLog`` skips
the steps metrics.jsonl already held before it was cut back to the checkpoint (their values are equal: resume is
bit-exact on CPU); the steps from there on are logged once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Protocol

from esr.config import Config, ConfigError, to_dict
from esr.errors import EsrError

EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
"""The module each tracker needs (its extra of esr-distill has the same name)."""
STATE_FILE = "trackers.json"
"""Run ids of the trackers that continue a run on resume, in the run folder."""


class TrackerError(EsrError, RuntimeError):
    """A tracker of ``log.trackers`` could not start (no login, a tracking URI it cannot use, ...)."""


HINTS = {"wandb": "log in (wandb login) or set WANDB_MODE=offline to keep the run local",
         "mlflow": "check MLFLOW_TRACKING_URI (unset: the run's mlflow.db)",
         "trackio": "check TRACKIO_DIR", "tensorboard": "check the run folder's tb/"}


class Tracker(Protocol):
    def log_config(self, config: dict[str, Any]) -> None: ...
    def log_metrics(self, step: int, values: dict[str, float]) -> None: ...
    def log_table(self, step: int, rows: list[dict[str, Any]]) -> None: ...
    def close(self, status: str) -> None:
        """``status``: ``finished``, ``stopped`` (graceful stop, resumable) or ``failed``."""


def check_trackers(cfg: Config) -> None:
    """Every tracker ``log.trackers`` names must be installed: a ConfigError naming the extra, before models load."""
    for name in cfg.log.trackers or ():
        if importlib.util.find_spec(EXTRA[name]) is None:
            raise ConfigError(f"log.trackers names {name}, but {EXTRA[name]} is not installed: "
                              f"pip install \"esr-distill[{name}]\" (or drop {name} from log.trackers)")


def default_trackers(cfg: Config) -> tuple[str, ...]:
    """``log.trackers``, or when unset TensorBoard if it is installed (esr's behaviour before trackers)."""
    if cfg.log.trackers is not None:
        return tuple(dict.fromkeys(cfg.log.trackers))
    if importlib.util.find_spec("tensorboard") is not None:
        return ("tensorboard",)
    logging.getLogger("esr.train").info(  # say once per run what is not written and how to get it
        "TensorBoard is not installed: tb/ is not written (metrics.jsonl is). pip install 'esr-distill[tensorboard]'")
    return ()


def open_trackers(cfg: Config, run_dir: Path) -> list[Tracker]:
    """Start (or, with ids in trackers.json, continue) every tracker of the run and log the config to it."""
    state = _read_state(run_dir)
    project, name = cfg.log.project or cfg.name, cfg.log.run_name or run_dir.name
    config = to_dict(cfg)
    opened: list[Tracker] = []
    try:
        for kind in default_trackers(cfg):
            try:
                opened.append(_OPEN[kind](run_dir, project, name, config, state))
            except Exception as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise TrackerError(f"log.trackers: {kind} could not start ({first}); {HINTS[kind]}, or drop {kind} "
                                   "from log.trackers") from e
    except BaseException:
        for tracker in opened:  # the ones started before the one that failed
            tracker.close("failed")
        raise
    _write_state(run_dir, state)
    for tracker in opened:
        tracker.log_config(config)
    return opened


class TensorBoardTracker:
    def __init__(self, writer: Any) -> None:
        self.writer = writer  # a torch.utils.tensorboard.SummaryWriter

    def log_config(self, config: dict[str, Any]) -> None:
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flatten(config).items()), 0)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_table(self, step: int, rows: list[dict[str, Any]]) -> None:
        header = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
        body = "".join("| " + " | ".join(_cell(v) for v in row.values()) + " |\n" for row in rows)
        self.writer.add_text("samples", header + body, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, project: str, name: str, config: dict[str, Any], state: dict) -> None:
        import wandb
        self.wandb = wandb
        run_id = state.setdefault("wandb", {}).setdefault("id", secrets.token_hex(4))
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(run_dir),
                              config=config)
        state["wandb"]["mode"] = "offline" if self.run.offline else "online"

    def log_config(self, config: dict[str, Any]) -> None:
        pass  # given to wandb.init (a resumed run keeps it)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_table(self, step: int, rows: list[dict[str, Any]]) -> None:
        table = self.wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
        self.run.log({"samples": table}, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=1 if status == "failed" else 0)


class TrackioTracker:
    def __init__(self, run_dir: Path, project: str, name: str, config: dict[str, Any], state: dict) -> None:
        import trackio
        self.trackio = trackio
        self.run = trackio.init(project=project, name=name, config=config, resume="allow", embed=False)
        state["trackio"] = {"project": project, "name": name}

    def log_config(self, config: dict[str, Any]) -> None:
        pass  # given to trackio.init

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self.trackio.log(values, step=step)

    def log_table(self, step: int, rows: list[dict[str, Any]]) -> None:
        table = self.trackio.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
        self.trackio.log({"samples": table}, step=step)

    def close(self, status: str) -> None:
        self.trackio.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, project: str, name: str, config: dict[str, Any], state: dict) -> None:
        from mlflow import MlflowClient
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        # the run's own store keeps its artifacts (the samples tables) beside it, not in the working directory
        artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (run_dir / "mlartifacts").resolve().as_uri()
        self.client = MlflowClient(uri)
        kept = state.get("mlflow", {})
        if kept.get("tracking_uri") == uri and kept.get("run_id"):
            self.run_id = kept["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            self.resumed = True
        else:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = (experiment.experiment_id if experiment is not None else
                             self.client.create_experiment(project, artifact_location=artifacts))
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            self.resumed = False
        state["mlflow"] = {"tracking_uri": uri, "run_id": self.run_id}

    def log_config(self, config: dict[str, Any]) -> None:
        if self.resumed:
            return  # params are write-once in MLflow: the run has them
        from mlflow.entities import Param
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for a in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[a : a + 100])

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), v, now, step) for k, v in values.items()])

    def log_table(self, step: int, rows: list[dict[str, Any]]) -> None:
        columns = {k: [r[k] for r in rows] for k in rows[0]}
        self.client.log_table(self.run_id, data=columns, artifact_file=f"samples/step-{step:06d}.json")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status={"finished": "FINISHED", "stopped": "KILLED"}.get(status,
                                                                                                        "FAILED"))


def _open_tensorboard(run_dir: Path, project: str, name: str, config: dict[str, Any], state: dict) -> Tracker:
    from torch.utils.tensorboard import SummaryWriter
    return TensorBoardTracker(SummaryWriter(str(run_dir / "tb")))


_OPEN = {"tensorboard": _open_tensorboard, "wandb": WandbTracker, "trackio": TrackioTracker,
         "mlflow": MlflowTracker}


def mlflow_key(key: str) -> str:
    """A metric name MLflow accepts: characters other than alphanumerics, ``_ - . : /`` and space become ``_``
    (``eval/pass@1`` -> ``eval/pass_1``)."""
    return re.sub(r"[^\w\-. :/]", "_", key)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts as ``{"a.b.c": value}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def numbers(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a row (bools, None, text and ``step`` left out) as ``prefix/key``; a nested mapping
    (``by_source``: {name: {kl, ...}}) as ``prefix/key/name/...``."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(numbers(f"{prefix}/{k}", v))
        elif k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}/{k}"] = float(v)
    return out


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    if state:
        tmp = run_dir / f".{STATE_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, run_dir / STATE_FILE)
