"""A sweep's best job: by its objective, ties to the earlier job, with the runner-up's gap
weighed against the test set's noise."""

from omegaconf import OmegaConf

from pipeline.sweep_end import best_line
from pipeline.sweeps.objectives import best_job
from pipeline.sweeps.outcomes import JobOutcome

SEARCH = {"objective": "accuracy", "drop_estimate": "point", "max_accuracy_drop": 1.0}


def job(number: str, accuracy: float, status: str = "finished", metrics=("accuracy",)):
    record = {
        "config": {"sparsity": 0.1, "search": SEARCH | {"metrics": list(metrics)}},
        "pruned": {"accuracy": accuracy, "macs": 5.0, "test_samples": 400},
        "baseline": {"macs": 10.0},
        "latency_ratio": {"ratio": 0.8},
        "accuracy_change": {"points": 0.0, "ci_low": -1.0, "ci_high": 1.0},
    }
    return JobOutcome(number, status, [f"sparsity=0.{number}"], record, None, run_id=f"r{number}")


def test_the_best_job_is_the_most_accurate_and_a_tie_goes_to_the_earlier_one():
    outcomes = [job("1", 0.90), job("2", 0.95), job("3", 0.95), job("4", 0.99, "failed")]
    assert best_job(outcomes).number == "2"
    assert best_job([job("1", 0.9, "failed")]) is None


def test_a_pareto_search_has_no_single_best():
    search = SEARCH | {"objective": "pareto"}
    outcomes = [job("1", 0.9, metrics=("accuracy", "macs")), job("2", 0.8)]
    outcomes[0].record["config"]["search"] = search | {"metrics": ["accuracy", "macs"]}
    assert best_job(outcomes) is None


def test_the_best_line_says_whether_the_runner_up_is_inside_the_noise():
    config = OmegaConf.create({"search": {"objective": "accuracy"}})
    close = [job("1", 0.950), job("2", 0.945)]
    line = best_line(best_job(close), close, config)
    assert line.startswith("best job by search.objective=accuracy: job 1 (sparsity=0.1): ")
    assert "MACs ratio 0.500, latency ratio 0.800, run r1" in line
    assert line.endswith(
        "; next: job 2, 0.50 pts lower, within the test set's noise (+-2.14 pts over 400 images)"
    )
    apart = [job("1", 0.95), job("2", 0.80)]
    assert "15.00 pts lower, beyond the test set's noise" in best_line(apart[0], apart, config)
