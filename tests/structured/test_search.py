"""The output-guided allocation search (cap_dist/structured/search.py) on synthetic output errors with a known
optimum, its pass allowance, and the refusal of an allocation that predicts the same output for every image."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from cap_dist.config import StructuredConfig
from cap_dist.structured.allocate import BudgetError, lagrangian_counts, linear_savings
from cap_dist.structured.prune import allocate, plan_structured, prune_structured
from cap_dist.structured.search import greedy_output_counts, refine_counts, removal_levels
from cap_dist.structured.trial import OutputProbe, first_images, trial_weights
from tests.structured.test_prune import _vit_and_data


def test_levels_step_by_an_eighth_and_end_at_the_largest_allowed_count() -> None:
    every = torch.ones(9, dtype=torch.bool)                               # 8 heads, whole branch allowed
    wide = torch.ones(129, dtype=torch.bool)
    wide[116:128] = False                                                 # partial limit 115, whole 128
    even = torch.tensor([k % 2 == 0 for k in range(11)])                  # only even counts of 10
    levels = removal_levels({"heads": every, "mlp": wide, "even": even, "none": torch.tensor([True])},
                            {"heads": 8, "mlp": 128, "even": 10, "none": 1})
    assert levels["heads"] == list(range(1, 9))
    assert levels["mlp"] == [16, 32, 48, 64, 80, 96, 112, 115, 128]
    assert levels["even"] == [2, 4, 6, 8, 10]
    assert levels["none"] == []


def _branch_problem():
    """Three 'attention' structures (a*) and three 'mlp' ones (m*), two levels each (half, whole). Each a* alone
    costs little, but all three a* gone leave the model blind (a large error); the m* are dearer alone, but
    independent. Every whole structure saves 10, a half 1; the budget needs five whole structures' worth."""
    names = ["a0", "a1", "a2", "m0", "m1", "m2"]
    savings = {n: torch.tensor([0.0, 1.0, 10.0], dtype=torch.float64) for n in names}
    single = {"a0": 0.10, "a1": 0.11, "a2": 0.12, "m0": 0.30, "m1": 0.31, "m2": 0.32}

    def error_of(counts: dict[str, int]) -> float:
        err = sum(single[n] * (0.2 if k == 1 else 1.0) for n, k in counts.items() if k)
        if all(counts[a] == 2 for a in ("a0", "a1", "a2")):
            err += 5.0
        return err

    return names, savings, single, error_of, 50.0


def _brute_force(levels, savings, budget, error_of) -> float:
    names = sorted(levels)
    best = math.inf
    for combo in itertools.product(*[[0] + levels[n] for n in names]):
        counts = dict(zip(names, combo))
        if sum(float(savings[n][k]) for n, k in counts.items()) >= budget * (1 - 1e-12):
            best = min(best, error_of(counts))
    return best


def test_summed_single_errors_remove_every_attention_and_the_search_does_not() -> None:
    names, savings, single, error_of, budget = _branch_problem()
    curves = {n: torch.tensor([0.0, 0.2 * single[n], single[n]], dtype=torch.float64) for n in names}
    additive = lagrangian_counts(curves, savings, budget)                  # what the calibrated curves choose
    assert all(additive[a] == 2 for a in ("a0", "a1", "a2"))
    assert error_of(additive) > 5.0
    levels = {n: [1, 2] for n in names}
    greedy = greedy_output_counts(levels, savings, budget, error_of, max_passes=1000)
    assert sum(float(savings[n][k]) for n, k in greedy.counts.items()) >= budget
    assert greedy.error == pytest.approx(error_of(greedy.counts)) and greedy.error < 5.0
    refined = refine_counts(additive, levels, savings, budget, error_of, 1000, error_of(additive))
    optimum = _brute_force(levels, savings, budget, error_of)
    assert refined.error == pytest.approx(optimum)                         # out of the trap, to the optimum
    assert sum(float(savings[n][k]) for n, k in refined.counts.items()) >= budget


@pytest.mark.parametrize("seed", range(6))
def test_greedy_then_refine_is_near_the_brute_force_optimum_on_random_problems(seed: int) -> None:
    """Separable convex errors plus a random pairwise interaction, linear savings: never worse than the greedy,
    always within the budget, and within 10 % of the brute-force optimum (exact on most)."""
    g = torch.Generator().manual_seed(seed)
    names = ["s0", "s1", "s2", "s3"]
    groups = {"s0": 4, "s1": 4, "s2": 6, "s3": 3}
    cost = {n: float(torch.rand(1, generator=g)) + 0.5 for n in names}
    savings = linear_savings(cost, {n: groups[n] + 1 for n in names})
    weight = {n: float(torch.rand(1, generator=g)) + 0.1 for n in names}
    pair = torch.rand(4, 4, generator=g).double() * 0.3

    def error_of(counts: dict[str, int]) -> float:
        frac = torch.tensor([counts[n] / groups[n] for n in names], dtype=torch.float64)
        return float(sum(weight[n] * frac[i] ** 2 for i, n in enumerate(names)) + frac @ pair @ frac)

    valid = {n: torch.ones(groups[n] + 1, dtype=torch.bool) for n in names}
    levels = removal_levels(valid, groups)
    budget = 0.5 * sum(float(savings[n][-1]) for n in names)
    greedy = greedy_output_counts(levels, savings, budget, error_of, 1000)
    refined = refine_counts(greedy.counts, levels, savings, budget, error_of, 1000, greedy.error)
    optimum = _brute_force(levels, savings, budget, error_of)
    assert refined.error <= greedy.error + 1e-12
    assert sum(float(savings[n][k]) for n, k in refined.counts.items()) >= budget * (1 - 1e-12)
    assert refined.error <= 1.1 * optimum + 1e-12


def test_the_pass_allowance_is_kept() -> None:
    names, savings, _, error_of, budget = _branch_problem()
    levels = {n: [1, 2] for n in names}
    with pytest.raises(BudgetError, match="search_passes"):
        greedy_output_counts(levels, savings, budget, error_of, max_passes=5)
    start = {n: 2 for n in names}
    refined = refine_counts(start, levels, savings, budget, error_of, 3, error_of(start))
    assert refined.passes == 3 and refined.error <= error_of(start)
    with pytest.raises(BudgetError, match="allow"):
        greedy_output_counts(levels, savings, 61.0, error_of, max_passes=100)


def test_the_constant_predictor_error_is_the_best_constant_output() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 5, generator=g, dtype=torch.float64) * 2
    probe = OutputProbe.__new__(OutputProbe)
    probe.dense, probe.images = [logits[:7], logits[7:]], 12
    for kind in ("classifier", "encoder"):
        probe.kind = kind
        best = probe.constant_error()
        if kind == "classifier":
            p = F.softmax(logits, 1)
            direct = float((p * (p.log() - p.mean(0).log())).sum(1).mean())
            others = [F.softmax(logits[i], 0).expand_as(p) for i in range(3)]
            worse = [float((p * (p.log() - q.log())).sum(1).mean()) for q in others]
        else:
            mean = logits.mean(0)
            direct = float(((logits - mean).pow(2).sum(1) / logits.pow(2).sum(1)).mean())
            worse = [float(((logits - logits[i]).pow(2).sum(1) / logits.pow(2).sum(1)).mean()) for i in range(3)]
        assert best == pytest.approx(direct, rel=1e-12)
        assert all(best < w for w in worse)


def test_an_allocation_that_predicts_the_same_for_every_image_is_refused() -> None:
    """Class-token pooling: with every attention branch gone the class token sees no image. A target only whole
    branches everywhere reach must fail before anything is written, saying why and what to do."""
    model, inputs = _vit_and_data()
    cfg = StructuredConfig(target=0.05, max_fraction=0.5, branches=True)
    with pytest.raises(BudgetError, match="same output for every image.*raise structured.target"):
        prune_structured(model, inputs, cfg)


def test_the_search_adds_its_candidates_and_never_loses_to_the_others() -> None:
    model, inputs = _vit_and_data()
    cfg = StructuredConfig(target=0.6, max_fraction=0.75, branches=True)
    plan = plan_structured(model, inputs, cfg)
    alloc = allocate(plan, model, inputs, cfg)
    assert {"calibrated", "global", "uniform", "greedy", "refined"} == set(alloc.candidates)
    assert alloc.candidates["refined"] <= min(v for k, v in alloc.candidates.items() if k != "refined")
    assert alloc.chosen == min(alloc.candidates, key=alloc.candidates.__getitem__)
    off = allocate(plan, model, inputs, cfg.model_copy(update={"search": False}))
    assert {"greedy", "refined"}.isdisjoint(off.candidates)


def test_first_images_cuts_across_batches_in_order() -> None:
    batches = [torch.arange(5).float(), torch.arange(5, 9).float(), torch.arange(9, 12).float()]
    for count in (1, 5, 7, 12, 50):
        got = first_images(batches, count)
        assert torch.equal(torch.cat(got), torch.arange(min(count, 12)).float())
        assert all(len(x) for x in got)
    with pytest.raises(ValueError, match="at least one image"):
        first_images(batches, 0)


def test_a_search_on_fewer_images_compares_its_candidates_on_all_of_them() -> None:
    """structured.search_images: the search's passes see that many images (most of the images the model sees in
    allocate), and greedy / refined are reported with their error on every calibration image, like the others."""
    model, inputs = _vit_and_data()
    cfg = StructuredConfig(target=0.6, max_fraction=0.75, branches=True, search_images=5)
    plan = plan_structured(model, inputs, cfg)
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda mod, args: seen.append(int(args[0].shape[0])))
    try:
        alloc = allocate(plan, model, inputs, cfg)
    finally:
        handle.remove()
    assert {"greedy", "refined"} <= set(alloc.candidates)
    assert alloc.chosen == min(alloc.candidates, key=alloc.candidates.__getitem__)
    assert alloc.search["images"] == 5 and alloc.search["greedy_passes"] + alloc.search["refine_passes"] > 10
    small = sum(1 for n in seen if n == 5)
    assert small > 10 and small > sum(1 for n in seen if n == 16)     # a whole probe is 2 batches of 16
    probe = OutputProbe(model, inputs, "classifier")
    for name in ("greedy", "refined"):
        weights, constants = plan.trial(alloc.candidate_counts[name], cfg.damp, cfg.damp_mode)
        with trial_weights(plan.consumers, weights, constants):
            assert probe.error() == pytest.approx(alloc.candidates[name], rel=1e-9)
