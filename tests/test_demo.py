"""The demo's parts that need neither Ray nor the demo packages: input checks, the output folder it owns, the
recipes it runs, the dense model run once per batch, the table's top-1 column and the one-line Ctrl-C exit.
The whole demo runs end to end (reduced) in tests/ray/test_demo.py."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from tqdm.auto import tqdm

from cap_dist import demo
from cap_dist.cli import build_parser, main
from cap_dist.eval import evaluate_model


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.5, 1.5])
def test_sparsity_outside_open_unit_interval_is_refused(sparsity: float, tmp_path: Path) -> None:
    with pytest.raises(demo.DemoError, match="fraction in \\(0, 1\\)"):
        demo.run_demo(sparsity=sparsity, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()          # refused before anything is written


def test_output_folder_of_something_else_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(demo.DemoError, match="not empty and was not written by the demo"):
        demo._claim_output(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(demo.DemoError, match="not a folder"):
        demo._claim_output(tmp_path / "file")


def test_rerun_clears_only_the_demos_own_entries(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    demo._claim_output(out)
    (out / "cap" / "layers").mkdir(parents=True)
    (out / "cap" / "layers" / "x.safetensors").write_bytes(b"old")  # the engine would resume from these
    (out / "comparison.json").write_text("{}")
    (out / "kept.txt").write_text("user file")
    demo._claim_output(out)
    assert not (out / "cap").exists() and not (out / "comparison.json").exists()
    assert (out / "kept.txt").exists() and (out / demo.MARKER).exists()


@pytest.mark.parametrize("size", [demo.FULL, demo.QUICK])
def test_recipes_use_the_ray_engine_and_reach_max_steps(size: demo.DemoSize, tmp_path: Path) -> None:
    data = demo.DemoData("d", {"uri": "calib.parquet"}, {"uri": "train.parquet", "batch_size": size.batch_per_worker},
                         {"uri": "eval.parquet"})
    for method in demo.METHODS:
        recipe = demo.demo_recipe(method, 0.5, data, tmp_path, size, cpus=1)
        assert (recipe.engine, recipe.distributed.actors, recipe.prune.method) == ("ray", 2, method)
        assert recipe.output == str(tmp_path / method) and recipe.model.source == demo.MODEL_SOURCE
        assert (recipe.finetune is not None) == (method == "cap")
    ft = demo.demo_recipe("cap", 0.5, data, tmp_path, size, cpus=1).finetune
    steps_per_epoch = math.ceil(math.ceil(size.train / 2) / size.batch_per_worker)     # 2 workers share each epoch
    assert ft.epochs * steps_per_epoch >= ft.max_steps == size.finetune_steps
    assert ft.checkpoint_every == ft.epochs and ft.workers == 2 and ft.distill.weight == 1.0
    assert ft.storage_path == str(tmp_path / "train")


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x)


def test_dense_runs_once_per_batch_for_all_comparisons() -> None:
    torch.manual_seed(0)
    dense = _Counting()
    once = demo.DenseOnce(dense)
    batches = [(torch.randn(5, 4), torch.tensor([0, 1, 2, -1, 0])) for _ in range(3)]
    first = evaluate_model(once, batches)
    student = nn.Linear(4, 3)
    scores = [evaluate_model(student, batches, dense_model=once) for _ in range(2)]
    assert dense.calls == 3
    direct = evaluate_model(student, batches, dense_model=dense)       # the same numbers as without the cache
    assert scores[0] == scores[1] == direct
    assert first["labelled"] == 12
    assert torch.equal(once(batches[0][0]), dense(batches[0][0]))


def test_top1_always_names_its_labelled_count() -> None:
    assert demo.format_top1({"top1": 2 / 3, "labelled": 12}) == "0.667 (on 12 labelled)"
    assert demo.format_top1({"top1": None, "labelled": 0}) == "—"
    rows = [{"name": "dense", "sparsity": 0.0, "top1": None, "labelled": 0, "agreement": None, "kl": None,
             "seconds": None},
            {"name": "cap one-shot", "sparsity": 0.5, "top1": 0.5, "labelled": 4, "agreement": 0.75, "kl": 0.1234,
             "seconds": 12.0}]
    table = demo.format_table(rows)
    assert "0.500 (on 4 labelled)" in table and "0.1234" in table and "50.0%" in table
    png = demo.comparison_png([dict(r, labelled=4, top1=0.5) for r in rows], "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_beside_returns_result_and_raises_error() -> None:
    assert demo.run_beside("t", lambda a, b=0: a + b, 2, b=3) == 5

    def fail() -> None:
        raise ValueError("in the helper thread")

    with pytest.raises(ValueError, match="in the helper thread"):
        demo.run_beside("t", fail)


def test_demo_flags_parse() -> None:
    args = build_parser().parse_args(["demo", "--photos", "--sparsity", "0.6", "--output", "x", "--quick"])
    assert (args.photos, args.sparsity, args.output, args.quick) == (True, 0.6, "x", True)
    args = build_parser().parse_args(["demo"])
    assert (args.photos, args.sparsity, args.output, args.quick) == (False, 0.5, "runs/demo", False)


def test_bad_sparsity_flag_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--sparsity", "1.2", "--output", str(tmp_path / "o")]) == 2
    assert "--sparsity 1.2: give a fraction in (0, 1)" in capsys.readouterr().err


def test_ctrl_c_ends_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(**kwargs: object) -> None:
        tqdm(total=3, desc="an engine's bar")           # left open, as an interrupted stage leaves it
        raise KeyboardInterrupt

    def exit_now(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(demo, "run_demo", interrupted)
    monkeypatch.setattr(os, "_exit", exit_now)
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--output", "somewhere"])
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("cap-dist demo: interrupted; Ray is shut down, partial outputs stay in "
                                            "somewhere")
    assert "Traceback" not in err
    from tqdm.std import tqdm as base

    assert not list(base._instances)
