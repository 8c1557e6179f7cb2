"""The comparison report (`python -m pipeline.report`): from a finished sweep's MLflow runs and
from measurements.json files of untracked runs, as report.md beside its figures and one
self-contained report.html that a browser shows whole; bad arguments fail with one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import ROOT, TINY, headless_browser, needs_chromium, run_cli
from pipeline.report.__main__ import main as report_main
from pipeline.report.compare import compared_models, pareto_front
from pipeline.report.sources import RunRecord

EXPERIMENT = "pruning"
SPARSITIES = ("0.05", "0.15", "0.3")
MODELS = {"baseline", *(f"mean_rank s={s}" for s in SPARSITIES)}
FIGURES = {
    "size_speed_quality.png",
    "accuracy_vs_macs.png",
    "latency_by_batch.png",
    "inference_resources.png",
    "recall_change.png",
    "confusion_matrices.png",
    "finetune_curves.png",
    "pruning_steps.png",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def store_uri(output_root: Path) -> str:
    return f"sqlite:///{output_root / 'mlflow.db'}"


def report(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """Run the report command in this process: its exit code, stderr lines and stdout."""
    try:
        code = report_main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A finished three-job digits sweep, tracked in MLflow; its output root."""
    output_root = tmp_path_factory.mktemp("report_sweep")
    result = run_cli(
        "-m",
        f"sparsity={','.join(SPARSITIES)}",
        *TINY,
        f"paths.output_root={output_root}",
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output_root


def parent_run(output_root: Path):
    client = MlflowClient(store_uri(output_root))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (parent,) = client.search_runs([experiment.experiment_id], "tags.sweep = 'true'")
    return client, parent


@pytest.fixture(scope="module")
def sweep_report(sweep, tmp_path_factory) -> Path:
    """`python -m pipeline.report --sweep <parent>` on the sweep's store; its output folder."""
    out = tmp_path_factory.mktemp("report") / "out"
    _, parent = parent_run(sweep)
    result = _report_cli(
        "--sweep", parent.info.run_id, "--tracking-uri", store_uri(sweep), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _report_cli(*args: str, cwd: Path = ROOT):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "pipeline.report", *args],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def table_rows(markdown: str, after: str) -> list[dict[str, str]]:
    """The rows of the first table after the text `after`, as {header: cell}."""
    lines = markdown.split(after, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    cells = lambda line: [cell.strip() for cell in line.strip("|").split(" | ")]  # noqa: E731
    header = cells(lines[start])
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, cells(line), strict=True)))
    return rows


def referenced_images(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


@pytest.mark.slow
def test_report_of_a_sweep_lists_every_model_and_shows_every_figure(sweep_report):
    markdown = (sweep_report / "report.md").read_text()
    rows = table_rows(markdown, "## Results")
    assert {row["model"] for row in rows} == MODELS, rows
    assert len(rows) == len(MODELS), "the shared baseline must appear once"
    change, latency = "Δ top-1, pts [95 % CI] (McNemar p)", "latency change [95 % CI]"
    for row in rows:
        if row["model"] == "baseline":
            assert row[change] == row[latency] == "—"
            continue
        assert re.fullmatch(r"[+-]\d+\.\d\d pts \[.*\].*\(p=.*\)", row[change]), row[change]
        assert re.match(r"[+-]\d+\.\d% \[", row[latency]), row[latency]
        assert row["sparsity"] in SPARSITIES and row["pruner"] == "mean_rank"
        assert (row["engine"], row["criterion"]) == ("NNI", "MeanRank of abs")
        assert row["front"] in ("yes", "no")

    images = referenced_images(markdown)
    assert set(images) == FIGURES, images
    for name in images:
        assert (sweep_report / name).read_bytes()[:8] == PNG_MAGIC, f"{name} is not a PNG"
    page = (sweep_report / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(images), "every figure embedded"
    assert not re.search(r'src="(?!data:)', page), "report.html must not load files"

    # Per class: digits' ten classes, each with precision and recall of every model.
    classes = table_rows(markdown, "## Per-class quality")
    assert [row["class"] for row in classes] == [str(k) for k in range(10)]
    assert all(len(row) == 4 + 2 * len(SPARSITIES) for row in classes)
    assert "## Resource use during inference" in markdown and "process CPU (%)" in markdown


@pytest.mark.slow
def test_a_sweep_ends_with_its_report_logged_to_the_parent_run(sweep):
    (sweep_dir,) = sweep.glob("sweeps/*/*")
    assert (sweep_dir / "report" / "report.html").exists()
    client, parent = parent_run(sweep)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html"} <= logged
    assert {f"report/{name}" for name in FIGURES} <= logged
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_measurements_keep_per_class_counts_and_each_models_inference_window(sweep):
    files = sorted(sweep.glob("sweeps/*/*/*/measurements.json"))
    assert len(files) == len(SPARSITIES)
    record = json.loads(files[0].read_text())
    classes = record["per_class"]
    images = record["accuracy_change"]["images"]
    assert sum(classes["support"]) == images
    for side in ("baseline", "pruned"):
        counts = classes[side]
        assert sum(map(sum, counts["confusion"])) == images
        assert counts["correct"] == [counts["confusion"][k][k] for k in range(10)]
        assert sum(counts["correct"]) == round(record[side]["accuracy"] * images)
        window = record["inference_resources"][side]
        assert len(window["seconds"]) >= 3, window
        assert len(window["process_cpu_percent"]) == len(window["seconds"])
        assert max(window["process_cpu_percent"]) > 0, "the model ran during its window"
    assert files[0].stat().st_size < 64_000, "measurements.json should stay small"


@pytest.mark.slow
@needs_chromium
def test_report_html_shows_the_table_and_every_image_in_a_browser(sweep_report):
    from selenium.webdriver.common.by import By

    with headless_browser(1400, 1000) as browser:
        browser.get((sweep_report / "report.html").as_uri())
        table = browser.find_element(By.ID, "results")
        assert table.is_displayed()
        shown = {
            row.find_element(By.CSS_SELECTOR, "td").text
            for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")
        }
        assert shown == MODELS
        images = browser.find_elements(By.TAG_NAME, "img")
        assert len(images) == len(FIGURES)
        for image in images:
            loaded = browser.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth > 0", image
            )
            assert loaded, f"{image.get_attribute('alt')} did not load"


@pytest.mark.slow
def test_report_from_measurements_files_of_untracked_runs(tmp_path):
    """tracking=none: the sweep still ends with its report, and the command takes the files."""
    output_root = tmp_path / "outputs"
    result = run_cli(
        "-m", "sparsity=0.05,0.3", *TINY, "tracking=none", f"paths.output_root={output_root}",
        cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (output_root / "mlflow.db").exists()
    (sweep_dir,) = output_root.glob("sweeps/*/*")
    assert (sweep_dir / "report" / "report.html").exists()

    files = sorted(sweep_dir.glob("*/measurements.json"))
    result = _report_cli(*map(str, files), cwd=tmp_path)  # default --out, under cwd
    assert result.returncode == 0, result.stderr[-3000:]
    (out,) = tmp_path.glob("outputs/reports/*/*")
    markdown = (out / "report.md").read_text()
    assert {row["model"] for row in table_rows(markdown, "## Results")} == {
        "baseline",
        "mean_rank s=0.05",
        "mean_rank s=0.3",
    }
    for name in referenced_images(markdown):
        assert (out / name).exists(), name
    assert not (tmp_path / "outputs" / "mlflow.db").exists(), "files only: no MLflow store"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give measurements.json paths or one of --experiment, --sweep, --runs"),
        (["--sweep"], "argument --sweep: expected one argument"),
        (["--experiment", "a", "--runs", "b"], "argument --runs: not allowed with"),
        (["--sweep", "abc", "some/measurements.json"], "--sweep: give it or measurements.json"),
        (["no/such/folder"], "no/such/folder: no such file or folder"),
        (["--tracking-uri", "sqlite:///x.db", "a.json"], "--tracking-uri: only with"),
        (["--sweep", "abc", "--tracking-uri", "sqlite:///{tmp}/none.db"], "no MLflow store"),
        (["{tmp}"], "no measurements.json under this folder"),
        (["{tmp}/bad.json"], "is not a pipeline measurements.json"),
        (["--out", "{tmp}/bad.json", "{tmp}/bad.json"], "--out {tmp}/bad.json: a file is there"),
    ],
)
def test_bad_arguments_fail_with_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"accuracy": 1}')
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    code, errors, _ = report(argv, capsys)
    assert code == 2
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert message.replace("{tmp}", str(tmp_path)) in errors[0], errors
    assert not (tmp_path / "none.db").exists(), "a missing store must not be created"


@pytest.mark.slow
def test_a_job_run_id_is_refused_as_a_sweep(sweep, capsys):
    client, parent = parent_run(sweep)
    job = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )[0]
    code, errors, _ = report(
        ["--sweep", job.info.run_id, "--tracking-uri", store_uri(sweep)], capsys
    )
    assert code == 2 and len(errors) == 1
    assert "is not a sweep's parent run" in errors[0]


def test_the_bad_argument_line_comes_from_the_command_itself(tmp_path):
    """As a user runs it: one line on stderr, exit 2, no traceback."""
    result = _report_cli("--sweep", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: argument --sweep: expected one argument (see python -m pipeline.report --help)"
    ]


def test_pareto_front_keeps_the_models_nothing_beats_on_both_axes():
    # (MACs, accuracy): the second is beaten by the first (cheaper and as accurate).
    points = [(1.0, 0.9), (2.0, 0.9), (3.0, 0.95), (0.5, 0.5), (3.0, 0.94)]
    assert pareto_front(points) == [True, False, True, True, False]


def test_runs_sharing_a_baseline_show_it_once_and_models_get_distinct_labels():
    def record(sparsity: float, epochs: int) -> dict:
        figures = {"params": 10, "accuracy": 0.9, "test_samples": 5, "latency_ms": {"p50": 1.0}}
        config = {"sparsity": sparsity, "finetune": {"epochs": epochs}, "seed": 1}
        return {"baseline": figures, "pruned": dict(figures), "config": config}

    runs = [
        RunRecord(record(0.1, 1), "a", pruner="apoz"),
        RunRecord(record(0.1, 3), "b", pruner="apoz"),
        RunRecord(record(0.2, 1), "c", pruner="apoz"),
    ]
    models = compared_models(runs)
    assert [m.label for m in models] == [
        "baseline",
        "apoz s=0.1 (finetune.epochs=1)",
        "apoz s=0.1 (finetune.epochs=3)",
        "apoz s=0.2",
    ]
    assert len(models[0].runs) == 3


def synthetic_record(sparsity: float, device: str = "cuda") -> dict:
    """A measurements.json as a CUDA run writes it, without running one (no GPU here)."""

    def side(params: int, accuracy: float, p50: float) -> dict:
        return {
            "accuracy": accuracy, "top5": 1.0, "loss": 0.1, "test_samples": 20, "params": params,
            "macs": params * 2, "size_bytes": params * 4, "latency_ms": {"p50": p50, "p90": p50},
            "throughput": 1000 / p50, "latency_device": device,
        }  # fmt: skip

    def window(utilisation: float) -> dict:
        return {
            "seconds": [0.1, 0.2, 0.3],
            "gpu_utilization_percent": [utilisation] * 3,
            "gpu_memory_mb": [900.0, 950.0, 950.0],
            "torch_cuda_peak_mb": [120.0] * 3,
            "process_cpu_percent": [99.0] * 3,
        }

    def counts(correct: list[int]) -> dict:
        confusion = [[c if i == j else 0 for j in range(2)] for i, c in enumerate(correct)]
        for i, c in enumerate(correct):
            confusion[i][1 - i] = 10 - c
        return {
            "correct": correct,
            "predicted": [sum(row[j] for row in confusion) for j in range(2)],
            "confusion": confusion,
        }

    pruned_params = int(1000 * (1 - sparsity))
    return {
        "baseline": side(1000, 0.9, 2.0),
        "pruned": side(pruned_params, 0.85, 1.5),
        "reduction_pct": {"size_bytes": 100 * sparsity},
        "accuracy_change": {
            "points": -5.0,
            "ci_low": -15.0,
            "ci_high": 5.0,
            "significant": False,
            "p_value": 0.5,
            "images": 20,
            "only_baseline_right": 2,
            "only_pruned_right": 1,
        },  # fmt: skip
        "latency_ratio": {
            "ratio": 0.75,
            "ci_low": 0.7,
            "ci_high": 0.8,
            "measurable": True,
            "noisy": False,
            "rounds": 20,
            "load_average": {"before": 0.1, "after": 0.1, "cpus": 16},
        },  # fmt: skip
        # Launch-bound at batch 1, following the MACs at 64.
        "latency_by_batch": [
            {
                "batch_size": size,
                "ratio": ratio,
                "ci_low": ratio - 0.02,
                "ci_high": ratio + 0.02,
                "measurable": True,
                "noisy": False,
                "rounds": 20,
                "baseline_ms": {"p50": 2.0 * size},
                "pruned_ms": {"p50": 2.0 * size * ratio},
                "peak_memory_mb": {"baseline": 10.0 * size, "pruned": 10.0 * size * (1 - sparsity)},
            }
            for size, ratio in ((1, 0.99), (8, 0.5 + sparsity), (64, 1 - sparsity))
        ],  # fmt: skip
        "per_class": {
            "classes": 2,
            "support": [10, 10],
            "only_baseline_right": [2, 0],
            "only_pruned_right": [0, 1],
            "baseline": counts([9, 9]),
            "pruned": counts([7, 10]),
        },
        "inference_resources": {
            "window": "each model alone",
            "batch_size": 64,
            "interval_s": 0.1,
            "device": device,
            "baseline": window(80.0),
            "pruned": window(60.0),
        },  # fmt: skip
        "config": {"sparsity": sparsity, "pruner": {"_target_": "x.ActivationAPoZRankPruner"}},
        "device": device,
    }


def test_report_on_cuda_runs_shows_gpu_utilisation_and_memory(tmp_path):
    from pipeline.report.build import build_report

    runs = [RunRecord(synthetic_record(s), f"run {s}") for s in (0.2, 0.5)]
    markdown, page = build_report(runs, tmp_path / "out")
    text = markdown.read_text()
    series = {row["series"] for row in table_rows(text, "## Resource use during inference")}
    assert {"GPU utilisation (%)", "GPU memory used (MB)"} <= series
    assert {row["model"] for row in table_rows(text, "## Results")} == {
        "baseline",
        "APoZRank s=0.2",
        "APoZRank s=0.5",
    }
    # Class 0 lost recall for both models: marked; class 1 did not fall.
    assert "class 0 -20.0 pts" in text
    rows = table_rows(text, "## Latency at each batch size")
    assert [(row["model"], row["batch"]) for row in rows] == [
        (model, size) for model in ("APoZRank s=0.2", "APoZRank s=0.5") for size in ("1", "8", "64")
    ]
    at_64 = rows[-1]  # sparsity 0.5: a latency ratio of 0.5 and a MACs ratio of 0.5
    assert at_64["latency ratio [95 % CI]"] == "0.500 [0.480, 0.520]"
    assert at_64["MACs ratio"] == "0.500" and at_64["latency / MACs"] == "1.00"
    assert at_64["peak GPU memory, MiB (ratio)"] == "640.0 → 320.0 (0.500)"
    assert "latency_by_batch.png" in referenced_images(text)
    for name in referenced_images(text):
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC
    assert "No fine-tuning epoch ran" in text


def test_runs_measured_before_per_class_counts_still_get_a_report(tmp_path):
    from pipeline.report.build import build_report

    record = synthetic_record(0.3, device="cpu")
    del record["per_class"], record["inference_resources"], record["latency_by_batch"]
    markdown, _ = build_report([RunRecord(record, "old")], tmp_path / "out")
    text = markdown.read_text()
    assert "No latency at each batch size in these runs" in text
    assert "No per-class counts in these runs" in text
    assert "No resource use during inference in these runs" in text
    for name in referenced_images(text):
        assert (tmp_path / "out" / name).exists()
