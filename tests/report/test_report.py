"""`esr.report.write_report` on real tiny runs: self-contained HTML, markdown twin, errors, torn lines, analyses."""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from esr import plots as plots_module
from esr.config import load_config
from esr.report import ReportError, write_report
from esr.report.analysis import discover_paths, flatten
from esr.report.fmt import flops, num, sci, seconds
from esr.train import train

SMOKE = "configs/smoke.yaml"
BASE = ["train.steps=3", "train.checkpoint_every=1", "eval.every=2", "eval.limit=2", "eval.max_new_tokens=6"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, needs_smollm2_package: None) -> tuple[Path, Path]:
    """Two real 3-step smoke runs with an evaluation at step 2: ESR (run-a) and full rollouts (run-b)."""
    root = tmp_path_factory.mktemp("report-runs")
    train(load_config(SMOKE, BASE), root / "run-a", progress=False)
    train(load_config(SMOKE, [*BASE, "rollout.horizon=full"]), root / "run-b", progress=False)
    return root / "run-a", root / "run-b"


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run folder without its checkpoints (cheap to change per test)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    return dst


def rewrite_metrics(run: Path, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Rewrite every line of a run's metrics.jsonl through ``change``."""
    rows = [change(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def table(markdown: str, column: str) -> dict[str, dict[str, str]]:
    """The first markdown table with a column named ``column``: {first cell: {column: cell}} per row."""
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split(" | ")]

    for block in re.findall(r"((?:^\|.*\|\n)+)", markdown, flags=re.M):
        lines = block.splitlines()
        columns = cells(lines[0])
        if column in columns:
            return {row[0]: dict(zip(columns, row, strict=True)) for row in map(cells, lines[2:])}
    raise AssertionError(f"no table with a column {column!r} in:\n{markdown}")


def test_html_is_self_contained_and_compares_both_runs(runs: tuple[Path, Path], tmp_path: Path) -> None:
    html_path, md_path = write_report(list(runs), tmp_path / "cmp.html", title="ESR vs full")
    assert (html_path, md_path) == (tmp_path / "cmp.html", tmp_path / "cmp.md")
    html = html_path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, flags=re.I)
    assert "<script" not in html and "<link" not in html and "@import" not in html
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) >= 4  # loss, KL, eval, phases
    assert all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    assert "<title>ESR vs full</title>" in html and "prefers-color-scheme: dark" in html
    for run in runs:
        best = json.loads((run / "eval" / "best.json").read_text())
        row = re.search(rf"{run.name}</td>(.*?)</tr>", html).group(1)
        assert "<td>3 / 3</td>" in row and f"@ step {best['step']}" in row
    assert "esr (N=16, T=32)" in html and "full (T=32)" in html
    assert "No collapse warnings." in html


def test_markdown_twin_has_a_row_per_run_and_writes_its_pngs(runs: tuple[Path, Path], tmp_path: Path) -> None:
    _, md_path = write_report(list(runs), tmp_path / "out" / "report.md")
    md = md_path.read_text()
    for run, horizon in zip(runs, ["esr (N=16, T=32)", "full (T=32)"], strict=True):
        row = table(md, "best eval")[run.name]
        assert [row["student"], row["teacher"], row["horizon"]] == ["tiny-student", "tiny-teacher", horizon]
        assert row["steps"] == "3 / 3" and row["best eval"] == "accuracy 0 @ step 2"
    compute = table(md, "tokens generated")  # 3 steps x 4 rollouts: ESR stops at N=16 tokens, full at T=32
    assert [compute[run.name]["tokens generated"] for run in runs] == ["192", "384"]
    assert [compute[run.name]["steps"] for run in runs] == ["3", "3"]
    links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert {Path(link).name for link in links} >= {"loss.png", "kl.png", "eval.png", "phases.png"}
    for link in links:
        assert (md_path.parent / link).read_bytes().startswith(PNG_MAGIC)
    assert "data:image" not in md


def test_default_output_goes_into_the_first_run_folder(runs: tuple[Path, Path], tmp_path: Path) -> None:
    run = copy_run(runs[0], tmp_path / "run-a")
    html_path, md_path = write_report([run])
    assert html_path == run / "report.html" and md_path == run / "report.md"
    assert (run / "report_files" / "loss.png").is_file()
    again, _ = write_report([run])  # the report's own PNGs are not mistaken for analysis outputs
    assert "No analysis outputs found" in again.read_text()


def test_missing_folder_or_metrics_raise_a_clear_error(runs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"run folder .*no-such-run does not exist") as info:
        write_report([runs[0], tmp_path / "no-such-run"])
    assert isinstance(info.value, ValueError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=r"empty has no metrics.jsonl"):
        write_report([tmp_path / "empty"])
    with pytest.raises(ReportError, match="no run folders"):
        write_report([])


def test_torn_last_metrics_line_is_skipped_and_noted(runs: tuple[Path, Path], tmp_path: Path) -> None:
    run = copy_run(runs[0], tmp_path / "run-torn")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.03, "kl": 0.0')  # a crash mid-write
    _, md_path = write_report([run], tmp_path / "torn.html")
    md = md_path.read_text()
    assert table(md, "best eval")["run-torn"]["steps"] == "3 / 3"
    assert "skipped 1 unreadable line in metrics.jsonl" in md


def test_analysis_outputs_are_found_and_rendered(runs: tuple[Path, Path], tmp_path: Path) -> None:
    run = copy_run(runs[0], tmp_path / "run-an")
    (run / "analysis").mkdir()
    cascade = {"n_prompts": 12, "total_flops": 1.23e15, "nested": {"depth": 3},
               "levels": [{"horizon": 50, "kl": 0.5}, {"horizon": 100, "kl": 0.25}]}
    (run / "analysis" / "cascade.json").write_text(json.dumps(cascade))
    fake_png = PNG_MAGIC + b"fake kl profile"
    (run / "kl_profile.png").write_bytes(fake_png)
    html_path, md_path = write_report([run, runs[1]], tmp_path / "an.html")
    html, md = html_path.read_text(), md_path.read_text()
    assert "run-an · analysis/cascade.json" in html and "run-an · kl_profile.png" in html
    assert base64.b64encode(fake_png).decode() in html
    assert table(md, "field")["n_prompts"]["value"] == "12"
    assert "| total_flops | 1.23e15 |" in md and "| nested.depth | 3 |" in md
    assert "| 100 | 0.25 |" in md  # the list of objects became a table
    copied = [md_path.parent / link for link in re.findall(r"\]\(([^)]*kl_profile\.png)\)", md)]
    assert len(copied) == 1 and copied[0].read_bytes() == fake_png


def test_explicit_analysis_paths_and_flops_columns(runs: tuple[Path, Path], tmp_path: Path) -> None:
    run, old = copy_run(runs[0], tmp_path / "run-flops"), copy_run(runs[1], tmp_path / "run-old")
    rewrite_metrics(run, lambda r: {**r, "flops_generate": 1e12, "flops_score": 2e12, "flops_train": 4e12})
    rewrite_metrics(old, lambda r: {k: v for k, v in r.items() if not k.startswith("flops_")})
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "decay.json").write_text(json.dumps({"half_life": 87.5}))
    _, md_path = write_report([run, old], tmp_path / "f.html", analyses=[tmp_path / "probe" / "decay.json"])
    md = md_path.read_text()
    compute = table(md, "tokens generated")
    assert [compute["run-flops"][f"FLOPs {p}"] for p in ("generate", "score", "train", "total")] == [
        "3.0e12", "6.0e12", "1.2e13", "2.1e13"]
    assert compute["run-old"]["FLOPs total"] == "—"  # runs from before FLOPs were logged still report
    assert "decay.json" in md and "| half_life | 87.5 |" in md
    with pytest.raises(ReportError, match="not a JSON or PNG"):
        discover_paths([tmp_path / "nothing.txt"])


def test_an_analysis_with_its_own_markdown_summary_is_shown_as_written(runs: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    modes = tmp_path / "modes"
    modes.mkdir()
    (modes / "modes.json").write_text(json.dumps({"rows": [{"name": "base", "modes": {"top1_match": 0.375}}]}))
    (modes / "modes.md").write_text("# Modes\n\nWhere the **student's** top-1 sits.\n\n| model | top-1 match |\n"
                                    "|---|---:|\n| base | 37.5% |\n| ragged | 1% | extra |\n")
    html_path, md_path = write_report([runs[0]], tmp_path / "m.html", analyses=[modes])
    md = md_path.read_text()
    assert table(md, "top-1 match")["base"]["top-1 match"] == "37.5%"
    assert table(md, "top-1 match")["ragged"]["top-1 match"] == "1%"  # the extra cell is cut, not a new column
    assert "Where the student's top-1 sits." in md and "<strong>" not in html_path.read_text()
    assert "top1_match" not in md  # the JSON is not dumped as well


def test_same_folder_names_are_told_apart(runs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = copy_run(runs[0], tmp_path / "x" / "run"), copy_run(runs[1], tmp_path / "y" / "run")
    _, md_path = write_report([a, b], tmp_path / "same.html")
    md = md_path.read_text()
    header = table(md, "best eval")
    assert header["x/run"]["horizon"] == "esr (N=16, T=32)" and header["y/run"]["horizon"] == "full (T=32)"


def test_without_matplotlib_tables_remain(runs: tuple[Path, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots_module, "available", lambda: False)
    html_path, md_path = write_report([runs[0]], tmp_path / "noplots.html")
    html = html_path.read_text()
    assert "data:image/png" not in html and "matplotlib is not installed" in html
    assert table(md_path.read_text(), "best eval")["run-a"]["steps"] == "3 / 3"


def test_number_formatting() -> None:
    assert sci(1.2e15) == "1.2e15" and sci(3.4e-5) == "3.4e-5"
    assert flops(1.234e15) == "1.2e15" and flops(None) == "—"
    assert seconds(12.34) == "12.3 s" and seconds(0.347) == "0.35 s" and seconds(252) == "4.2 min"
    assert num(12345) == "12,345" and num(0.0319295) == "0.03193" and num(2.5e9) == "2.50e9" and num(None) == "—"


def test_flatten_splits_scalars_and_tables() -> None:
    scalars, tables = flatten({"a": 1, "b": {"c": 2}, "rows": [{"x": 1}], "by": {"esr": {"k": 1}, "full": {"k": 2}}})
    assert scalars == [("a", 1), ("b.c", 2)]
    assert tables == [("rows", [{"x": 1}]), ("by", [{"": "esr", "k": 1}, {"": "full", "k": 2}])]


def test_extrapolation_events_get_a_table(runs: tuple[Path, Path], tmp_path: Path) -> None:
    effopd = tmp_path / "run-effopd"
    train(load_config(SMOKE, ["train.steps=2", "optim.extrapolate.enabled=true"]), effopd, progress=False)
    _, md_path = write_report([effopd, runs[0]], tmp_path / "x.html")
    md = md_path.read_text()
    assert "## Extrapolation (EffOPD)" in md
    rows = [line for line in md.splitlines() if line.startswith("| run-effopd |") and "probe" not in line]
    events = [json.loads(line) for line in (effopd / "extrapolate" / "events.jsonl").read_text().splitlines()]
    extrapolation_rows = [r for r in rows if r.split(" | ")[1] in ("1", "2") and len(r.split(" | ")) == 7]
    assert len(extrapolation_rows) == len(events) == 2
    assert table(md, "extrapolate s/step")["run-effopd"]["extrapolate s/step"] != "0.00"
