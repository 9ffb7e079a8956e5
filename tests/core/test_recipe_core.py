"""The recipe's parsed parts and the core's allocation and result types."""

from __future__ import annotations

import hashlib
import json

import pytest

from cap_dist.config import RecipeError, recipe_from_dict
from cap_dist.core import LayerRecord, PruneResult, curve_depth, layer_levels, overall_sparsity
from cap_dist.solvers import Pattern, parse_pattern

BASE = {"model": {"source": "x"}, "calibration": {"uri": "x"}, "output": "x"}


def recipe(**prune):
    return recipe_from_dict({**BASE, "prune": prune})


def test_pattern_is_parsed_once_and_written_back_as_text() -> None:
    r = recipe(pattern="2:4")
    assert r.prune.pattern == Pattern(2, 4) and r.prune.pattern.structured
    assert r.model_dump(mode="json")["prune"]["pattern"] == "2:4"
    assert parse_pattern(r.prune.pattern) is r.prune.pattern
    assert recipe_from_dict(r.model_dump(mode="json")) == r                    # round trip
    assert recipe().prune.pattern == Pattern() and not recipe().prune.pattern.structured


def test_hash_is_that_of_the_recipe_text() -> None:
    """The parsed pattern must not change what the hash covers: outputs of earlier versions stay resumable."""
    r = recipe(pattern="2:4", method="sparsegpt")
    payload = r.model_dump(mode="json", exclude={"output", "overwrite", "engine", "distributed",
                                                  "threads", "storage"})
    assert payload.pop("structured") is None    # a recipe without the structured section hashes as before it existed
    assert payload["prune"]["pattern"] == "2:4"
    assert r.hash == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("value", ["3:3", "2-4", 124])
def test_bad_patterns_are_recipe_errors(value) -> None:
    with pytest.raises(RecipeError, match="prune.pattern"):
        recipe(pattern=value)


def test_block_size_meanings_are_named_apart() -> None:
    assert recipe(block_size=64).prune.cap_block == 64 and recipe(block_size=64).prune.sweep_block == 64
    whole_rows = recipe(block_size=None).prune
    assert whole_rows.cap_block is None and whole_rows.sweep_block == 128


def test_levels_uniform_n_m_and_global() -> None:
    assert layer_levels(recipe(sparsity=0.6).prune, ["a", "b"]) == {"a": 0.6, "b": 0.6}
    assert layer_levels(recipe(pattern="1:4").prune, ["a"]) == {"a": 0.75}
    with pytest.raises(ValueError, match="needs every layer's loss curve"):
        layer_levels(recipe(allocation="global").prune, ["a"])
    cfg = recipe(max_layer_sparsity=0.9).prune
    assert curve_depth(cfg) == pytest.approx(0.95)


def test_one_result_type_with_the_overall_sparsity() -> None:
    rows = [LayerRecord("a", "blocks.0", 2, 4, 8, 0.5, 0.5, 0.1, 0.01, 0.0, 0.01, 0),
            LayerRecord("b", "blocks.1", 4, 6, 24, 0.75, 0.75, 0.2, 0.02, 0.0, 0.01, 0)]
    result = PruneResult(recipe=recipe(), engine="local", layers=rows)
    assert result.sparsity == overall_sparsity(rows) == pytest.approx((4 + 18) / 32)
    assert result.output == "x" and result.model is None and result.manifest is None


def test_polish_defaults_are_the_methods_own() -> None:
    """cap polishes by default; the baselines stay the methods their papers describe (upstream damping, no
    polish) unless the recipe says otherwise."""
    from cap_dist.solvers import DEFAULT_CAP_ADMM

    cap = recipe().prune
    assert cap.polish == dict(resolve=True, admm=DEFAULT_CAP_ADMM, refine=0, polish_damp=None)
    assert cap.method_damp_mode == "relative"
    for method in ("sparsegpt", "obs"):
        base = recipe(method=method).prune
        assert base.polish == dict(resolve=False, admm=0, refine=0, polish_damp=None)
        assert base.method_damp_mode == "mean"
    assert recipe(method="wanda").prune.method_damp_mode == "relative"
    assert recipe(method="sparsegpt", damp_mode="relative").prune.method_damp_mode == "relative"
    assert recipe(method="sparsegpt", resolve=True).prune.polish["resolve"] is True
    assert recipe(admm_iterations=0, resolve=False, refine=2, polish_damp=1e-4).prune.polish == dict(
        resolve=False, admm=0, refine=2, polish_damp=1e-4)
    assert recipe(curvature="fisher").prune.polish == dict(resolve=False, admm=0, refine=0, polish_damp=None)


@pytest.mark.parametrize("key,value", [("resolve", True), ("admm_iterations", 5), ("refine", 1)])
def test_polish_with_fisher_curvature_is_a_recipe_error(key: str, value) -> None:
    with pytest.raises(RecipeError, match="activation curvature"):
        recipe(curvature="fisher", **{key: value})


@pytest.mark.parametrize("key,value", [("admm_iterations", -1), ("refine", -2), ("damp_mode", "diag")])
def test_bad_polish_keys_are_recipe_errors(key: str, value) -> None:
    with pytest.raises(RecipeError, match=f"prune.{key}"):
        recipe(**{key: value})
