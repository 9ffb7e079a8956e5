"""The measured latency table (``structured.measure: latency``): slopes from timed widths, a structure whose time
does not fall saves nothing, and an allocation on the table reaches its predicted target and makes the model faster."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from cap_dist.config import StructuredConfig
from cap_dist.models.structures import find_structures
from cap_dist.structured.allocate import BudgetError
from cap_dist.structured.latency import batch_of, fastest, measure_latency, slope_per_group
from cap_dist.structured.prune import allocate, plan_structured, prune_structured


def test_slope_is_the_least_squares_time_per_group() -> None:
    points = [(8, 8e-3 + 1e-4), (6, 6e-3 + 1e-4), (4, 4e-3 + 1e-4), (2, 2e-3 + 1e-4)]
    assert slope_per_group(points) == pytest.approx(1e-3, rel=1e-9)
    noisy = [(8, 1.0), (6, 0.7), (4, 0.5), (2, 0.1)]
    g = torch.tensor([8.0, 6, 4, 2], dtype=torch.float64)
    t = torch.tensor([1.0, 0.7, 0.5, 0.1], dtype=torch.float64)
    reference = torch.linalg.lstsq(torch.stack([g, torch.ones(4, dtype=torch.float64)], 1), t[:, None]).solution[0]
    assert slope_per_group(noisy) == pytest.approx(float(reference), rel=1e-9)


def test_a_structure_whose_time_does_not_fall_saves_nothing() -> None:
    assert slope_per_group([(8, 1.0), (4, 1.2), (2, 1.3)]) == 0.0
    with pytest.raises(ValueError, match="two different widths"):
        slope_per_group([(4, 1.0), (4, 2.0)])


def test_batch_of_repeats_the_calibration_images() -> None:
    inputs = [torch.arange(3.0).reshape(3, 1), torch.arange(3.0, 5.0).reshape(2, 1)]
    assert batch_of(inputs, 12).flatten().tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert batch_of(inputs, 2).shape == (2, 1)


@pytest.fixture(autouse=True)
def one_thread():
    """Timed on one thread: two threads on this 2-core machine time erratically when anything else runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vit() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """Big enough that a module at a quarter of its width is measurably faster than whole, small enough for CI."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=2, num_heads=8, mlp_ratio=4.0,
                              num_classes=5).eval()
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(16, 3, 32, 32, generator=g) for _ in range(2)]


def test_the_table_times_every_structure_at_four_widths_and_finds_the_savings() -> None:
    model, inputs = _vit()
    structures = find_structures(model, ("mlp", "heads"), ())
    table = measure_latency(model, structures, inputs, batch=32)
    assert table.batch == 32 and table.model_seconds > 0
    assert set(table.per_group) == {s.name for s in structures}
    for s in structures:
        kept = [k for k, _ in table.points[s.name]]
        assert kept == [s.groups, round(0.75 * s.groups), round(0.5 * s.groups), round(0.25 * s.groups)]
        whole, quarter = table.points[s.name][0][1], table.points[s.name][-1][1]
        assert quarter < whole, f"{s.name}: a quarter of the width was not faster ({quarter} vs {whole} s)"
        assert table.per_group[s.name] > 0
    # the timed copies are shrunk copies: the model itself keeps its widths
    assert [s.groups for s in find_structures(model, ("mlp", "heads"), ())] == [s.groups for s in structures]


def test_a_latency_target_is_reached_by_the_table_and_the_model_gets_faster() -> None:
    model, inputs = _vit()
    x = batch_of(inputs, 32)
    with torch.inference_mode():
        dense_s = fastest([lambda: model(x)], torch.get_num_threads())[0]
    cfg = StructuredConfig(target=0.6, measure="latency", latency_batch=32, allocation="global")
    plan = plan_structured(model, inputs, cfg)
    counts = allocate(plan, model, inputs, cfg).counts
    assert sum(plan.unit[n] * k for n, k in counts.items()) >= (1 - 0.6) * plan.total * (1 - 1e-9)
    records = prune_structured(model, inputs, cfg)         # (times its own table)
    assert all(r.latency_per_group_us is not None and r.latency_per_group_us >= 0 for r in records)
    assert any(r.kept < r.groups for r in records)
    with torch.inference_mode():
        pruned_s = fastest([lambda: model(x)], torch.get_num_threads())[0]
    assert pruned_s < 0.9 * dense_s, f"pruned {pruned_s * 1e3:.3f} ms vs dense {dense_s * 1e3:.3f} ms"


def test_an_unreachable_latency_target_is_refused_with_the_least_reachable() -> None:
    model, inputs = _vit()
    cfg = StructuredConfig(target=0.05, measure="latency", latency_batch=8, max_fraction=0.5)
    with pytest.raises(BudgetError, match=r"measured latency at batch 8.*at least 0\.\d+ stays.*latency_batch"):
        plan_structured(model, inputs, cfg)


def test_an_unreachable_flops_target_names_the_least_reachable() -> None:
    model, inputs = _vit()
    with pytest.raises(BudgetError, match=r"keeps less of the MACs.*max_fraction=0.5 at least 0\.\d+ stays"):
        plan_structured(model, inputs, StructuredConfig(target=0.2, max_fraction=0.5))


def test_whole_branches_are_timed_and_save_a_step_at_full_removal() -> None:
    from cap_dist.structured.latency import LatencyTable

    model, inputs = _vit()
    structures = find_structures(model, ("mlp", "heads"), ())
    table = measure_latency(model, structures, inputs, batch=1, branches=True)
    assert set(table.branch) == {s.name for s in structures}
    for s in structures:                  # at batch 1 a whole branch costs far more than its slope predicts
        assert table.branch[s.name] > 0
        assert table.branch[s.name] >= 0.5 * table.points[s.name][0][1], (s.name, table.branch[s.name])
    assert measure_latency(model, structures, inputs, batch=1).branch == {}
    steps = LatencyTable(1, 1.0, {"m": 0.01}, {"m": []}, {"m": 0.5})
    assert steps.savings("m", 4, 4).tolist() == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.5])
    assert steps.savings("m", 4, 3).tolist() == pytest.approx([0.0, 0.01, 0.02, 0.03])   # not removable whole


def test_the_model_time_is_its_fastest_pass_over_every_structures_rounds(monkeypatch) -> None:
    """A VM slow for the first timing must not shrink every structure's share: the whole model is timed in each
    structure's rounds and its fastest pass kept."""
    from cap_dist.structured import latency

    model, inputs = _vit()
    structures = find_structures(model, ("mlp", "heads"), ())
    clock = {"calls": 0}

    def scripted(call, threads: int) -> float:     # the model: 10 ms at first, 1 ms later; a module: by its size
        clock["calls"] += 1
        if set(call.__code__.co_freevars) == {"model", "x"}:
            return 0.010 if clock["calls"] <= latency.ROUNDS else 0.001
        module = (call.__defaults__ or (None,))[0]
        return 1e-9 * sum(p.numel() for p in module.parameters()) if isinstance(module, torch.nn.Module) else 1e-6

    monkeypatch.setattr(latency, "time_call", scripted)
    table = measure_latency(model, structures, inputs, batch=4)
    assert table.model_seconds == pytest.approx(0.001)


def test_a_saved_table_is_reused_and_a_foreign_one_refused(tmp_path, monkeypatch) -> None:
    """structured.latency_table: the first prune times and writes it, the next reads the very same table (no
    timing), and a table of other structures, another batch, or not JSON is refused by name."""
    import cap_dist.structured.prune as prune_module

    model, inputs = _vit()
    path = str(tmp_path / "latency.json")
    cfg = StructuredConfig(target=0.7, measure="latency", latency_batch=4, latency_table=path, branches=True)
    first = plan_structured(model, inputs, cfg)
    written = (tmp_path / "latency.json").read_text()

    def no_timing(*args, **kwargs):
        raise AssertionError("a saved table must not be timed again")

    monkeypatch.setattr(prune_module, "measure_latency", no_timing)
    second = plan_structured(model, inputs, cfg.model_copy(update={"method": "obs"}))
    assert second.latency == first.latency and second.budget == first.budget
    assert {n: v.tolist() for n, v in second.savings.items()} == {n: v.tolist() for n, v in first.savings.items()}
    with pytest.raises(ValueError, match="batch 4.*latency_batch=8"):
        plan_structured(model, inputs, cfg.model_copy(update={"latency_batch": 8}))
    with pytest.raises(ValueError, match="other structures"):
        plan_structured(model, inputs, cfg.model_copy(update={"structures": ["mlp"]}))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a latency table"):
        plan_structured(model, inputs, cfg.model_copy(update={"latency_table": str(tmp_path / "bad.json")}))
    assert (tmp_path / "latency.json").read_text() == written          # reading never rewrote it
    assert not list(tmp_path.glob(".*.tmp"))
