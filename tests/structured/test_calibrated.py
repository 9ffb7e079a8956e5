"""The calibrated allocation: its pure pieces (blends, probe counts, curves rescaled to the model's output error,
the output error itself), trials that are exactly the physically pruned model and leave the model as it was, and
the choice of the candidate with the least calibration error."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from cap_dist.config import StructuredConfig
from cap_dist.structured.allocate import blend_counts, output_scaled_curves, probe_counts, smallest_valid_at_least
from cap_dist.structured.prune import allocate, plan_structured, prune_structured
from cap_dist.structured.trial import OutputProbe, output_error, trial_weights
from tests.structured.test_prune import _vit_and_data


def test_blends_reach_the_budget_of_their_ends_on_allowed_counts() -> None:
    valid = {"a": torch.tensor([True, False, True, False, True, False, True]), "b": torch.ones(9, dtype=torch.bool)}
    cost = {"a": 3.0, "b": 1.0}
    a, b = {"a": 6, "b": 0}, {"a": 2, "b": 8}
    budget = min(sum(cost[n] * k for n, k in c.items()) for c in (a, b))
    assert blend_counts(a, b, 1.0, valid) == a and blend_counts(a, b, 0.0, valid) == b
    for alpha in (0.1, 0.25, 0.5, 0.75, 0.9):
        blend = blend_counts(a, b, alpha, valid)
        assert blend["a"] % 2 == 0                                  # only allowed counts
        assert min(a["a"], b["a"]) <= blend["a"] <= max(a["a"], b["a"])
        assert sum(cost[n] * k for n, k in blend.items()) >= budget
    with pytest.raises(ValueError, match="alpha"):
        blend_counts(a, b, 1.5, valid)


def test_smallest_valid_count_at_or_above() -> None:
    valid = torch.tensor([True, False, False, True, False, True])
    assert [smallest_valid_at_least(valid, c) for c in (0, 0.5, 3, 3.2, 5)] == [0, 3, 3, 5, 5]
    with pytest.raises(ValueError, match="reaches"):
        smallest_valid_at_least(valid, 5.5)


def test_probes_sit_at_the_uniform_count_and_never_at_zero_when_a_cut_is_allowed() -> None:
    valid = {"a": torch.ones(5, dtype=torch.bool), "b": torch.tensor([True, False, True]),
             "c": torch.tensor([True, False])}
    assert probe_counts({"a": 3, "b": 0, "c": 0}, valid) == {"a": 3, "b": 2, "c": 0}


def test_scaled_curves_pass_through_the_measured_output_error() -> None:
    curves = {"a": torch.tensor([0.0, 0.1, 0.3]), "b": torch.tensor([0.0, 2.0, 5.0]),
              "c": torch.tensor([0.0, 0.0, 1.0]), "d": torch.tensor([0.0, 1.0, torch.inf])}
    probes = {"a": 2, "b": 1, "c": 1, "d": 1}
    errors = {"a": 0.6, "b": 0.5, "c": 0.0, "d": 4.0}
    scaled = output_scaled_curves(curves, probes, errors)
    assert float(scaled["a"][2]) == pytest.approx(0.6) and float(scaled["a"][1]) == pytest.approx(0.2)
    assert float(scaled["b"][1]) == pytest.approx(0.5) and float(scaled["b"][2]) == pytest.approx(1.25)
    assert float(scaled["d"][1]) == pytest.approx(4.0) and torch.isinf(scaled["d"][2])   # forbidden stays forbidden
    # c's layer loss is 0 at its probe: no measured sensitivity, so the median of the others' (2.0, 0.25, 4.0)
    assert float(scaled["c"][2]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="finite"):
        output_scaled_curves(curves, probes, {**errors, "a": float("nan")})
    with pytest.raises(ValueError, match="same structures"):
        output_scaled_curves(curves, {"a": 1}, errors)


def test_output_error_is_kl_for_logits_and_relative_error_for_embeddings() -> None:
    g = torch.Generator().manual_seed(0)
    dense, out = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    kl = F.kl_div(F.log_softmax(out.double(), 1), F.log_softmax(dense.double(), 1), log_target=True,
                  reduction="sum")
    assert output_error(out, dense, "classifier") == pytest.approx(float(kl))
    assert output_error(dense, dense, "classifier") == pytest.approx(0.0, abs=1e-12)
    assert output_error(2 * dense, dense, "encoder") == pytest.approx(6.0)      # each row: ‖d‖²/‖d‖² = 1
    with pytest.raises(ValueError, match="differ"):
        output_error(out[:, :5], dense, "classifier")


def test_trial_weights_restore_the_model_even_when_the_body_fails() -> None:
    layer = torch.nn.Linear(4, 3)
    before = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with trial_weights({"l": layer}, {"l": torch.zeros(3, 4)}):
            assert float(layer.weight.detach().abs().sum()) == 0.0
            raise RuntimeError("boom")
    assert torch.equal(layer.weight, before)
    with pytest.raises(KeyError):
        with trial_weights({"l": layer}, {"other": torch.zeros(3, 4)}):
            pass


def _effnet_and_data() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=5).eval()
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]


@pytest.mark.parametrize("build, method", [(_vit_and_data, "cap"), (_effnet_and_data, "magnitude")],
                         ids=["vit", "effnet"])
def test_a_trial_computes_the_physically_pruned_model(build, method: str) -> None:
    """Zeroed consumer columns with the re-solved kept ones are the smaller model, so candidates are judged on the
    function they would produce (on EfficientNet with magnitude's order: the greedy over 1,152 channels is slow)."""
    model, inputs = build()
    cfg = StructuredConfig(target=0.8, allocation="uniform", method=method, max_fraction=0.5)
    pruned = copy.deepcopy(model)
    prune_structured(pruned, inputs, cfg)
    plan = plan_structured(model, inputs, cfg)
    counts = allocate(plan, model, inputs, cfg).counts
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = {s.consumer: plan.trial_weight(s.name, counts[s.name], cfg.damp, cfg.damp_mode)
               for s in plan.structures if counts[s.name]}
    with torch.no_grad(), trial_weights(plan.consumers, weights):
        tried = model(inputs[0])
    with torch.no_grad():
        torch.testing.assert_close(tried, pruned(inputs[0]), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_calibrated_keeps_the_candidate_with_the_least_calibration_error() -> None:
    model, inputs = _vit_and_data()
    cfg = StructuredConfig(target=0.6, allocation="calibrated")
    plan = plan_structured(model, inputs, cfg)
    alloc = allocate(plan, model, inputs, cfg)
    assert {"calibrated", "global", "uniform"} <= set(alloc.candidates)
    assert alloc.chosen == min(alloc.candidates, key=alloc.candidates.__getitem__)
    assert alloc.counts == alloc.candidate_counts[alloc.chosen]
    for counts in alloc.candidate_counts.values():                     # every candidate reaches the target
        assert sum(plan.unit[n] * k for n, k in counts.items()) >= plan.budget * (1 - 1e-9)
    probe = OutputProbe(model, inputs, "classifier")
    assert probe.error() == pytest.approx(0.0, abs=1e-12)               # the trials left the dense model intact
    consumer = {s.name: s.consumer for s in plan.structures}
    weights = {consumer[n]: plan.trial_weight(n, k, cfg.damp, cfg.damp_mode) for n, k in alloc.counts.items() if k}
    with trial_weights(plan.consumers, weights):
        assert probe.error() == pytest.approx(alloc.candidates[alloc.chosen], rel=1e-6)
