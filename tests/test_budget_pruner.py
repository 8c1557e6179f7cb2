"""A budget run without a pruner ranks with the default for budgets; anything said of the
pruner keeps the command line's own choice."""

from __future__ import annotations

import pytest

from pipeline.config.budget_pruner import BUDGET_PRUNER, budget_pruner_override
from pipeline.config.compose import compose, group_choices


@pytest.mark.parametrize(
    ("args", "added"),
    [
        (["budget.macs=0.35"], True),
        (["-m", "budget.params=0.5,0.3", "dataset=fashion_mnist"], True),
        (["budget.latency=0.6", "hydra.run.dir=x"], True),
        (["sparsity=0.15"], False),  # no budget
        ([], False),
        (["budget.macs=null"], False),
        (["pruner=mean_rank", "budget.macs=0.35"], False),  # the mission's pruner, kept
        (["budget.macs=0.35", "pruner.round_to=8"], False),  # configures the default pruner
        (["budget.macs=0.35", "+recipe=reference"], False),  # a preset chooses
        (["budget.macs=0.35", "experiment=pets_reference"], False),
        (["sweep=engines", "budget.macs=0.35"], False),
    ],
)
def test_the_budget_default_is_added_only_where_nothing_chose_a_pruner(args, added):
    assert budget_pruner_override(args) == (f"pruner={BUDGET_PRUNER}" if added else None)


def test_the_budget_default_is_a_pruner_of_the_project():
    assert BUDGET_PRUNER in group_choices("pruner")
    cfg = compose(["budget.macs=0.35", budget_pruner_override(["budget.macs=0.35"])])
    assert cfg.pruner["_target_"].startswith("torch_pruning.")
    # Without a budget the project's default stays NNI's mean rank, as the mission documents.
    assert compose([]).pruner["_target_"].endswith("ActivationMeanRankPruner")
