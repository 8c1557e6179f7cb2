"""Which torchvision classifiers can the pipeline prune? A compatibility table.

Every classification builder of the installed torchvision (torchvision.models.list_models) goes,
for each pruner, through the pipeline's own stage functions at a small input size:

    build (random init, 10 classes) -> prune (dependency_aware, sparsity 0.3, one step, the
    project's channel rounding) -> speedup (pipeline.pruning.nni.adapter, with its replacement
    rules and checks) -> save_pruned -> load_pruned in a fresh Python process (which must not
    import NNI) -> outputs identical to the in-process pruned model's on the same input

and the row records pass/fail with the failing step and the first line of its error, the
params / MACs / CPU latency ratios of the pruned model against the unpruned one (batch 1, the
measure stage's alternating rounds), and the seconds it took. Each model runs in its own process
with a time limit, so one crash or hang costs one row. Models above --max-params are skipped,
listed as skipped and never counted as passing.

    python benchmarks/models.py                              # every builder, docs/models.md
    python benchmarks/models.py --models resnet18,vgg11 --output /tmp/models.md
    python benchmarks/models.py --max-params 100e6 --results outputs/models_results

Results are kept per model and pruner under --results; a rerun reuses them (--fresh redoes all),
so an interrupted run goes on where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRUNERS = ("mean_rank", "tp_magnitude")  # one per engine: NNI, Torch-Pruning
SPARSITY = 0.3
NUM_CLASSES = 10
DEFAULT_SIZE = 64
# Builders that need another input size: Inception v3 pools below 75 px; MaxViT partitions
# 7x7 windows at every stage; ViT-H/14's patches must tile the image.
SIZES = {"inception_v3": 96, "maxvit_t": 224, "vit_h_14": 56}
# Families whose whole graph Torch-Pruning 1.6.1 cannot prune (ShuffleNetV2's channel shuffle
# stops its tracer; Swin's and MaxViT's relative-position tables make its grouping grow until
# memory runs out): it prunes only the widths free inside these submodules
# (pruner.submodules), the MLP hidden width of a transformer block, the inner width of a
# ShuffleNet branch. The row says which layers it pruned.
FREE_WIDTHS = {
    "swin_": ["*.mlp"],
    "shufflenet_v2_": ["*.branch2"],
    "maxvit_": ["*.mlp_layer", "*.MBconv.layers"],
}
LATENCY_REPEATS = 40
# Set for workers that run side by side (--jobs > 1): their timings would measure each other, so
# the driver times every passing model afterwards, alone.
LATER_LATENCY = "MODELS_BENCHMARK_LATER_LATENCY"
META_LOCK = threading.Lock()
LATENCY_ROUNDS = 4


def builder_options(name: str, size: int) -> dict:
    """Keyword arguments a size-bound builder needs to run at `size`."""
    if name.startswith("vit_"):
        return {"image_size": size}
    return {}


def model_config(name: str, size: int) -> dict:
    return {
        "_target_": "pipeline.models.torchvision_classifier",
        "name": name,
        "num_classes": NUM_CLASSES,
        "weights": "none",
        **builder_options(name, size),
    }


# ---------------------------------------------------------------------------------------------
# One model, each pruner, in a process of its own (--worker).


def run_model(name: str, pruners: list[str], size: int, results: Path) -> list[dict]:
    """Every step for one model and each pruner, in this process but the reload (one fresh
    process for all of the model's pruned copies); each record says how far it got."""
    import warnings

    warnings.filterwarnings("ignore")
    import _common as common
    import torch

    from pipeline.models.stats import count_macs, count_params
    from pipeline.models.zoo import build_from_config

    shape = (3, size, size)
    config = model_config(name, size)
    common.seed_everything(common.SEED)
    started = time.perf_counter()
    base: dict = {"model": name, "size": size}
    try:
        model = build_from_config(config).eval()
        base |= {"params": count_params(model), "macs": count_macs(model, shape)}
    except Exception as error:
        return [_failed(base | {"pruner": p}, "build", error, started) for p in pruners]
    generator = torch.Generator().manual_seed(common.SEED)
    probe = torch.randn(2, *shape, generator=generator)
    records, pruned_models = [], {}
    for pruner in pruners:
        folder = results / f"{name}-{pruner}"
        folder.mkdir(parents=True, exist_ok=True)
        record, small = _prune_and_save(model, config, pruner, shape, folder, base, probe)
        records.append(record)
        if small is not None:
            pruned_models[pruner] = small
    # Reload every saved model in one fresh interpreter, then time the ones that came back equal.
    passed = [r for r in records if r.get("step") == "reload"]
    if passed:
        started = time.perf_counter()
        folders = [results / f"{name}-{r['pruner']}" for r in passed]
        try:
            outputs = _reload_elsewhere(folders, probe)
        except Exception as error:
            outputs = {str(f): error for f in folders}
        for record, folder in zip(passed, folders, strict=True):
            record["seconds"] += round(time.perf_counter() - started, 1) / len(passed)
            reloaded = outputs[str(folder)]
            if isinstance(reloaded, Exception):
                _failed(record, "reload", reloaded, None)
                continue
            expected = torch.load(folder / "expected.pt", weights_only=True)
            if not torch.equal(reloaded, expected):
                difference = (reloaded - expected).abs().max().item()
                _failed(
                    record,
                    "reload",
                    AssertionError(f"reloaded outputs differ (max |diff| {difference:.3g})"),
                    None,
                )
                continue
            if not os.environ.get(LATER_LATENCY):
                started_latency = time.perf_counter()
                record["latency"] = _latency_ratio(model, pruned_models[record["pruner"]], shape)
                record["seconds"] += round(time.perf_counter() - started_latency, 1)
            record["status"], record["step"] = "pass", None
    for record in records:
        record["seconds"] = round(record["seconds"], 1)
    return records


def free_widths(name: str) -> list[str] | None:
    """The submodules whose inner widths Torch-Pruning prunes when the whole graph fails."""
    return next((v for prefix, v in FREE_WIDTHS.items() if name.startswith(prefix)), None)


def pruner_overrides(pruner: str, model: str) -> list[str]:
    """One step at SPARSITY, on the CPU, with the options each engine reads: NNI's
    dependency-aware mode, two ranking batches for the pruners that rank on data, and
    Torch-Pruning's free widths for the families in FREE_WIDTHS."""
    import _common as common

    overrides = [
        f"pruner={pruner}",
        "pruner.iterations=1",
        "pruner.batch_size=8",
        "pruner.pruning_on_cuda=false",
        f"sparsity={SPARSITY}",
    ]
    composed = common.compose(overrides).pruner
    if composed.get("submodules") is not None and free_widths(model):
        overrides.append(f"pruner.submodules=[{','.join(map(repr, free_widths(model)))}]")
    if composed.get("mode") is not None:
        overrides.append("pruner.mode=dependency_aware")
    if composed.get("training_steps") is not None:
        overrides.append("pruner.training_steps=2")
    return overrides


def _prune_and_save(model, config, pruner, shape, folder, base, probe):
    """Prune a copy of `model` with `pruner`, speed it up, save it and its outputs on `probe`;
    the record's step is "reload" when all of that worked (the reload is the caller's)."""
    import _common as common
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.data.datasets import Loaders, StageInputs
    from pipeline.models.pruned import save_pruned
    from pipeline.models.stats import count_macs, count_params
    from pipeline.pruning.nni.adapter import quiet_nni
    from pipeline.stages.prune import prune
    from pipeline.stages.speedup import speedup

    record = base | {"pruner": pruner}
    started = time.perf_counter()
    step = "prune"
    try:
        quiet_nni()
        settings = common.project_settings(pruner_overrides(pruner, base["model"])).pruner
        common.seed_everything(common.SEED)
        generator = torch.Generator().manual_seed(common.SEED)
        images = torch.randn(16, *shape, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (16,), generator=generator)
        loader = DataLoader(TensorDataset(images, labels), batch_size=8)
        inputs = StageInputs(
            Loaders(train=loader, val=(), test=()),
            nn.CrossEntropyLoss(),
            torch.device("cpu"),
            shape,
        )
        pruned = prune(copy.deepcopy(model), inputs, settings, SPARSITY)

        step = "speedup"  # Torch-Pruning's model is already narrow: its narrow only checks it
        small = speedup(pruned.model, pruned.masks, inputs, settings, recalibrate=False).eval()
        record["pruned_params"] = count_params(small)
        record["pruned_macs"] = count_macs(small, shape)

        step = "save"
        save_pruned(small, config, folder / "pruned_model")
        with torch.no_grad():
            torch.save(small(probe), folder / "expected.pt")
    except Exception as error:
        (folder / "traceback.txt").write_text(traceback.format_exc())
        return _failed(record, step, error, started), None
    record |= {"status": "fail", "step": "reload", "seconds": time.perf_counter() - started}
    return record, small


def _failed(record: dict, step: str, error: BaseException, started: float | None) -> dict:
    from pipeline.pruning.nni.rules import failed_operation

    record |= {
        "status": "fail",
        "step": step,
        "error": _first_line(error),
        "operation": failed_operation(error),
    }
    if started is not None:
        record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _reload_elsewhere(folders: list[Path], probe) -> dict:
    """load_pruned in a fresh interpreter that must not import NNI: each folder's outputs on the
    probe (or the exception that loading raised)."""
    import torch

    probe_file = folders[0].parent / f"{folders[0].name}.probe.pt"
    torch.save(probe, probe_file)
    script = (
        "import sys, json, torch, pipeline\n"
        f"probe = torch.load({str(probe_file)!r}, weights_only=True)\n"
        "errors = {}\n"
        f"for folder in {[str(f) for f in folders]!r}:\n"
        "    try:\n"
        "        model = pipeline.load_pruned(folder + '/pruned_model')\n"
        "        with torch.no_grad():\n"
        "            torch.save(model(probe), folder + '/reloaded.pt')\n"
        "    except Exception as error:\n"
        "        errors[folder] = f'{type(error).__name__}: {error}'.splitlines()[0][:200]\n"
        "nni = [m for m in sys.modules if m == 'nni' or m.startswith('nni.')]\n"
        "print(json.dumps({'errors': errors, 'nni': bool(nni)}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=900
    )
    probe_file.unlink(missing_ok=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"load_pruned in a fresh process: {lines[-1] if lines else '?'}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    outputs: dict = {}
    for folder in folders:
        if report["nni"]:
            outputs[str(folder)] = RuntimeError("load_pruned imported NNI")
        elif str(folder) in report["errors"]:
            outputs[str(folder)] = RuntimeError(report["errors"][str(folder)])
        else:
            outputs[str(folder)] = torch.load(folder / "reloaded.pt", weights_only=True)
    return outputs


def _latency_ratio(baseline, pruned, shape) -> dict:
    import _common as common
    import torch

    settings = common.measure_settings(
        warmup=3, repeats=LATENCY_REPEATS, rounds=LATENCY_ROUNDS, runtime="eager"
    )
    pair, ratio, _ = common.timed_ratio(baseline, pruned, shape[-1], torch.device("cpu"), settings)
    return {key: ratio[key] for key in ("ratio", "ci_low", "ci_high")}


def _first_line(error: BaseException) -> str:
    from pipeline.errors import first_line

    return f"{type(error).__name__}: {first_line(error, 240)}"[:240]


# ---------------------------------------------------------------------------------------------
# The driver: one subprocess per model and pruner, then the table.


def run_all(args: argparse.Namespace) -> list[dict]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if args.models:
        wanted = args.models.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            sys.exit(f"--models: {', '.join(unknown)} not in torchvision {torchvision.__version__}")
        names = [name for name in names if name in wanted]
    pruners = args.pruners.split(",")
    records: list[dict] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for found in pool.map(lambda name: _model_rows(name, pruners, args), names):
            records += found
    if args.jobs > 1:
        time_alone(records, args.results)
    return records


def _model_rows(name: str, pruners: list[str], args: argparse.Namespace) -> list[dict]:
    """The model's recorded rows, running its worker for those not recorded yet."""
    records: list[dict] = []
    size = SIZES.get(name, DEFAULT_SIZE)
    files = {p: args.results / f"{name}-{p}" / "result.json" for p in pruners}
    kept = {}
    for pruner, file in files.items():
        if file.is_file() and not args.fresh:
            previous = json.loads(file.read_text())
            if not (args.redo_failed and previous["status"] == "fail"):
                kept[pruner] = previous
    todo = [p for p in pruners if p not in kept]
    records += kept.values()
    if not todo:
        return records
    params = _param_count(name, size)
    if params > args.max_params:
        new = [
            {"model": name, "pruner": p, "size": size, "params": params, "status": "skipped"}
            | {"error": f"{params / 1e6:.0f} M parameters > --max-params"}
            for p in todo
        ]
    else:
        new = _in_subprocess(name, todo, size, args.results, args.timeout, args.jobs)
    for record in new:
        files[record["pruner"]].parent.mkdir(parents=True, exist_ok=True)
        files[record["pruner"]].write_text(json.dumps(record, indent=2))
        records.append(record)
        print(_progress_line(record), flush=True)
    return records


def time_alone(records: list[dict], results: Path) -> None:
    """The latency of every passing model that has none yet, one model at a time in this
    process: the unpruned model built again (same builder, same seed) against the saved pruned
    one, read back with load_pruned."""
    import _common as common

    from pipeline.models.pruned import load_pruned
    from pipeline.models.zoo import build_from_config

    for record in records:
        if record["status"] != "pass" or "latency" in record:
            continue
        size, name = record["size"], record["model"]
        common.seed_everything(common.SEED)
        baseline = build_from_config(model_config(name, size)).eval()
        folder = results / f"{name}-{record['pruner']}"
        pruned = load_pruned(folder / "pruned_model")
        started = time.perf_counter()
        record["latency"] = _latency_ratio(baseline, pruned, (3, size, size))
        record["seconds"] = round(record["seconds"] + time.perf_counter() - started, 1)
        (folder / "result.json").write_text(json.dumps(record, indent=2))
        print(_progress_line(record), flush=True)
        del baseline, pruned


def _param_count(name: str, size: int) -> int:
    """Parameters of the builder's model, counted without allocating its weights."""
    import torch

    from pipeline.models.zoo import build_from_config

    # torch.device("meta") acts on every thread of the process: one model at a time. Builders
    # that compute their widths with tensors (RegNet) cannot run there: they are built for real.
    with META_LOCK:
        try:
            with torch.device("meta"):
                model = build_from_config(model_config(name, size))
        except NotImplementedError:
            model = build_from_config(model_config(name, size))
    return sum(p.numel() for p in model.parameters())


def _in_subprocess(
    name: str, pruners: list[str], size: int, results: Path, timeout: float, jobs: int = 1
) -> list[dict]:
    """run_model in a process of its own: a crash or a hang costs one model's rows."""
    output = results / f"{name}.worker.json"
    output.unlink(missing_ok=True)
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        ",".join(pruners),
        str(size),
        str(results),
    ]
    started = time.perf_counter()
    try:
        env = dict(os.environ)
        if jobs > 1:
            threads = str(max(1, (os.cpu_count() or 1) // jobs))
            env |= {LATER_LATENCY: "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode == 0 and output.is_file():
            return json.loads(output.read_text())
        lines = [line for line in (done.stderr or "").strip().splitlines() if line.strip()]
        step, error = "crash", f"exit {done.returncode}: {lines[-1][:200] if lines else '?'}"
    except subprocess.TimeoutExpired:
        step, error = "timeout", f"did not finish in {timeout:.0f} s"
    seconds = round(time.perf_counter() - started, 1)
    return [
        {"model": name, "pruner": p, "size": size, "status": "fail", "step": step}
        | {"error": error, "seconds": seconds}
        for p in pruners
    ]


def _progress_line(record: dict) -> str:
    if record["status"] == "pass":
        return (
            f"{record['model']:<22} {record['pruner']:<9} pass  params "
            f"{record['pruned_params'] / record['params']:.3f}  MACs "
            f"{record['pruned_macs'] / record['macs']:.3f}  latency "
            + (f"{record['latency']['ratio']:.3f}" if "latency" in record else "later")
            + f"  {record['seconds']:.0f} s"
        )
    where = record.get("step", "")
    status = f"{record['model']:<22} {record['pruner']:<9} {record['status']:<5}"
    return f"{status} {where}: {record.get('error', '')}"


# ---------------------------------------------------------------------------------------------
# docs/models.md


def engine_of(pruner: str) -> str:
    import _common as common

    target = common.compose([f"pruner={pruner}"]).pruner._target_
    return "Torch-Pruning" if target.startswith("torch_pruning.") else "NNI"


def best(rows: dict[str, dict], pruners: list[str]) -> str | None:
    """The passing pruner that removed the most compute (lowest MACs ratio, by more than half
    a point); at equal MACs the faster one where the latency intervals do not overlap, else
    "tie". None where none passed."""
    passing = [p for p in pruners if rows.get(p, {}).get("status") == "pass"]
    if not passing:
        return None

    def macs(pruner: str) -> float:
        return rows[pruner]["pruned_macs"] / rows[pruner]["macs"]

    least = min(macs(p) for p in passing)
    level = [p for p in passing if macs(p) - least <= 0.005]
    if len(level) == 1:
        return level[0]
    latencies = {p: rows[p].get("latency") for p in level}
    if any(value is None for value in latencies.values()):
        return "tie"
    fastest = min(level, key=lambda p: latencies[p]["ratio"])
    others = [latencies[p] for p in level if p != fastest]
    apart = all(latencies[fastest]["ci_high"] < other["ci_low"] for other in others)
    return fastest if apart else "tie"


def narrowed_layers(record: dict, results: Path) -> str:
    """Which layers the saved pruned model has narrower than the builder's: a count of the
    convolutions and linear layers, and their names with the block numbers starred where
    they fit in a few patterns."""
    import re

    import torch
    from torch import nn

    from pipeline.models.zoo import build_from_config

    saved = results / f"{record['model']}-{record['pruner']}" / "pruned_model"
    layers = json.loads((saved / "architecture.json").read_text())["layers"]
    with META_LOCK, torch.device("meta"):
        try:
            reference = dict(
                build_from_config(model_config(record["model"], record["size"])).named_modules()
            )
        except NotImplementedError:
            reference = None
    if reference is None:
        reference = dict(
            build_from_config(model_config(record["model"], record["size"])).named_modules()
        )
    widths = {"Conv2d": "out_channels", "Linear": "out_features"}
    layer_types = (nn.Conv2d, nn.Linear)  # subclasses too (an attention's out_proj)
    total = sum(1 for m in reference.values() if isinstance(m, layer_types)) - 1  # not the head
    narrowed = [
        name
        for name, spec in layers.items()
        if spec["type"] in widths
        and spec[widths[spec["type"]]] < getattr(reference[name], widths[spec["type"]])
    ]
    patterns = list(dict.fromkeys(re.sub(r"(?<=[._])\d+(?=\.|$)", "*", name) for name in narrowed))
    text = f"{len(narrowed)} of {total}"
    return text + (": " + ", ".join(patterns) if len(patterns) <= 3 else "")


def table(
    records: list[dict], pruners: list[str], command: str, results: Path | None = None
) -> str:
    from importlib.metadata import version

    import nni
    import torch
    import torchvision

    engines = {p: engine_of(p) for p in pruners}
    by_model: dict[str, dict[str, dict]] = {}
    for record in records:
        by_model.setdefault(record["model"], {})[record["pruner"]] = record
    total = len(by_model)
    counts = {
        pruner: sum(1 for rows in by_model.values() if rows.get(pruner, {}).get("status") == "pass")
        for pruner in pruners
    }
    either = sum(1 for rows in by_model.values() if best(rows, pruners))
    free = ", ".join(f"{prefix}* inside {', '.join(v)}" for prefix, v in FREE_WIDTHS.items())
    lines = [
        "# Which torchvision classifiers the pipeline prunes, with each engine",
        "",
        "Every classification builder of the installed torchvision, random weights, 10 classes, "
        f"through prune (sparsity {SPARSITY}, one step, channels rounded as the project's "
        "default `pruner.round_to`; NNI dependency_aware) -> speedup (NNI's ModelSpeedup; "
        "Torch-Pruning removes the channels while it prunes) -> `save_pruned` -> `load_pruned` "
        "in a fresh process that imports neither engine's code -> identical outputs. Ratios "
        "are the pruned model's against the unpruned one's; latency: CPU, batch 1, eager, "
        f"{LATENCY_REPEATS} calls each in {LATENCY_ROUNDS} alternating rounds (the measure "
        "stage's timing), with its 95 % interval. Input "
        f"{DEFAULT_SIZE}x{DEFAULT_SIZE} except "
        + ", ".join(f"{name} {size}x{size}" for name, size in SIZES.items())
        + " (ViT: `image_size` of the builder set to the input, so 16x16 or 32x32 patches "
        "tile it). Skipped models count as not passing.",
        "",
        "Pruned: how many of the model's convolutions and linear layers (the output layer "
        "aside) the saved model has narrower, with their names where a few patterns hold them "
        "(numbers starred). Where Torch-Pruning cannot trace or group the whole graph it "
        f"prunes only the widths free inside submodules ({free}: `pruner.submodules`); the "
        "MACs ratio shows how much that removed. Best engine: the passing one that removed "
        "the most MACs (by more than half a point); at equal MACs the faster one where the "
        "latency intervals do not overlap, else a tie.",
        "",
        "Passing end to end: "
        + ", ".join(f"**{counts[p]} of {total}** with `{p}` ({engines[p]})" for p in pruners)
        + f"; **{either} of {total} with at least one engine**. (Torch-Pruning publishes "
        "77 of 85 for its own pruners.)",
        "",
        f"Produced by `{command}` with torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, NNI {nni.__version__}, Torch-Pruning "
        f"{version('torch-pruning')}, Python {platform.python_version()}, on "
        f"{platform.machine()} ({os.cpu_count()} CPUs).",
        "",
        "| model | params (M) | "
        + " | ".join(f"{p} ({engines[p]}) | pruned | params | MACs | latency | s" for p in pruners)
        + " | best engine |",
        "|---|---:|" + "---|---|---:|---:|---:|---:|" * len(pruners) + "---|",
    ]
    for name in sorted(by_model):
        rows = by_model[name]
        params = next((r.get("params") for r in rows.values() if r.get("params")), None)
        cells = [name, f"{params / 1e6:.1f}" if params else "?"]
        for pruner in pruners:
            record = rows.get(pruner)
            if record and record["status"] == "pass" and results is not None:
                record["pruned"] = narrowed_layers(record, results)
            cells += _cells(record)
        winner = best(rows, pruners)
        cells.append(
            "none" if winner is None else "tie" if winner == "tie" else
            f"{engines[winner]} (`{winner}`)"
        )  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    for pruner in pruners:
        failures = [r for r in records if r["status"] != "pass" and r["pruner"] == pruner]
        if not failures:
            continue
        lines += ["", f"## What fails, and where (`{pruner}`, {engines[pruner]})", ""]
        for record in sorted(failures, key=lambda r: r["model"]):
            operation = f" ({record['operation']})" if record.get("operation") else ""
            lines.append(
                f"- **{record['model']}**: {record['status']} at {record.get('step', 'start')}"
                f"{operation}: {record.get('error', '')}"
            )
    return "\n".join(lines) + "\n"


def _cells(record: dict | None) -> list[str]:
    if record is None:
        return ["not run", "", "", "", "", ""]
    if record["status"] != "pass":
        label = "skipped" if record["status"] == "skipped" else f"fail: {record.get('step')}"
        seconds = f"{record.get('seconds', 0):.0f}" if "seconds" in record else ""
        return [label, "", "", "", "", seconds]
    latency = record.get("latency")
    return [
        "pass",
        record.get("pruned", "?"),
        f"{record['pruned_params'] / record['params']:.3f}",
        f"{record['pruned_macs'] / record['macs']:.3f}",
        f"{latency['ratio']:.2f} [{latency['ci_low']:.2f}, {latency['ci_high']:.2f}]"
        if latency
        else "not measured",
        f"{record['seconds']:.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated builders (default: all)")
    parser.add_argument("--pruners", default=",".join(PRUNERS))
    parser.add_argument(
        "--max-params",
        type=float,
        default=float("inf"),
        help="skip builders with more parameters (listed as skipped, not passing)",
    )
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per model and pruner")
    parser.add_argument("--results", type=Path, default=ROOT / "outputs" / "models_benchmark")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "models.md")
    parser.add_argument("--fresh", action="store_true", help="redo rows already recorded")
    parser.add_argument("--redo-failed", action="store_true", help="redo the rows that failed")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="models pruned side by side (each with cores/jobs threads); their latencies are "
        "then measured one model at a time",
    )
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, pruners, size, results = args.worker
        records = run_model(name, pruners.split(","), int(size), Path(results))
        (Path(results) / f"{name}.worker.json").write_text(json.dumps(records, indent=2))
        return
    records = run_all(args)
    command = "python benchmarks/models.py " + " ".join(sys.argv[1:])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table(records, args.pruners.split(","), command.strip(), args.results))
    print(f"table: {args.output}")


if __name__ == "__main__":
    main()
