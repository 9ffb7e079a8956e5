"""The `cap-dist` command.

    cap-dist prune --config jobs/vit4mnist.yaml prune.sparsity=0.75 output=runs/vit4mnist-75
    cap-dist eval runs/vit4mnist-75 --data ../shared/data/mnist --subset 512 10000
    cap-dist finetune --config jobs/vit4mnist.yaml --student runs/vit4mnist-75 finetune.epochs=2
    cap-dist layers ../shared/models/vit4mnist
    cap-dist solve --weight layer.safetensors --hessian layer.safetensors --method cap --sparsity 0.5 \
                   --block-size 128 --out pruned.safetensors

`solve` prunes one layer whose weight and input Hessian (or Fisher blocks) were saved as safetensors
(keys ``weight`` and ``hessian`` unless told otherwise) and writes the pruned weight and its mask.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from cap_dist.version import __version__


def _cmd_layers(args: argparse.Namespace) -> int:
    from cap_dist.config import ModelConfig
    from cap_dist.core import select_layers
    from cap_dist.models import flattened_weight
    from cap_dist.models.source import ModelSource

    model = ModelSource.parse(args.model).load()
    layers = select_layers(model, ModelConfig(source=args.model, targets=args.targets or None,
                                              ignore=args.ignore or None))
    width = max(len(n) for n in layers)
    for name, module in layers.items():
        w = flattened_weight(module)
        print(f"{name:<{width}}  {type(module).__name__:<7} [{w.shape[0]} × {w.shape[1]}]")
    print(f"{len(layers)} prunable layers, {sum(flattened_weight(m).numel() for m in layers.values()):,} weights")
    return 0


def _cmd_solve(args: argparse.Namespace) -> int:
    from cap_dist.solvers import prune_layer
    from cap_dist.storage import load_tensors, save_tensors

    weights = load_tensors(args.weight)
    hessians = weights if args.hessian == args.weight else load_tensors(args.hessian)
    for source, tensors, key in ((args.weight, weights, args.weight_key), (args.hessian, hessians, args.hessian_key)):
        if key not in tensors:
            raise ValueError(f"{source} has no tensor {key!r} (it has: {', '.join(sorted(tensors)) or 'none'})")
    weight, hessian = weights[args.weight_key], hessians[args.hessian_key]
    shape = weight.shape
    w2d = weight.reshape(shape[0], -1)
    res = prune_layer(w2d, hessian.to(w2d.device), method=args.method, sparsity=args.sparsity,
                      pattern=args.pattern, block_size=args.block_size, damp=args.damp)
    save_tensors(args.out, {"weight": res.weight.reshape(shape), "mask": res.mask.reshape(shape)},
                 metadata={"cap_dist.solve": json.dumps({"method": args.method, "pattern": args.pattern,   # one key:
                                                         "sparsity": f"{res.sparsity:.6f}"})})  # stable bytes
    summary = dict(out=args.out, sparsity=res.sparsity, relative_error=res.relative_error, loss=res.loss,
                   seconds=res.info["seconds"], damp_used=res.info.get("damp_used"))
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from cap_dist.engines import prune

    result = prune(args.config, args.overrides)
    print(f"wrote {result.output}: {len(result.layers)} layers at {result.sparsity:.2%} sparsity in "
          f"{result.timings['total']:.1f} s ({result.engine} engine, recipe {result.recipe.hash[:12]})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from cap_dist.config import DataConfig
    from cap_dist.data.draw import draw_batches
    from cap_dist.eval import evaluate_model, plot_layer_report  # noqa: I001
    from cap_dist.models.source import load_model
    from cap_dist.output import load_sparse, read_report

    model, manifest = load_sparse(args.output)
    recipe = manifest["recipe"]
    data = recipe.get("evaluation") or {}
    if args.data:
        data = {"uri": args.data}
    if not data:
        raise ValueError("no evaluation data: pass --data URI or give the recipe an 'evaluation' section")
    if args.subset:
        data["subset"] = tuple(args.subset)
    if args.samples:
        data["samples"] = args.samples
    batches = draw_batches(DataConfig(**data), manifest["input"], purpose="evaluation")
    dense = None
    if not args.no_dense:
        m = recipe["model"]
        dense, _ = load_model(m["source"], m.get("weights"), m.get("create_kwargs"))
    metrics = evaluate_model(model, batches, dense_model=dense, kind=args.kind)
    if args.kind == "encoder" and recipe.get("calibration") and batches[0][1] is not None:
        from cap_dist.eval import knn_from_batches

        bank = draw_batches(DataConfig(**recipe["calibration"]), manifest["input"], purpose="calibration")
        metrics["knn_top1"] = knn_from_batches(model, bank, batches)
        if dense is not None:
            metrics["dense_knn_top1"] = knn_from_batches(dense, bank, batches)
    rows = read_report(args.output)
    plot = None
    if rows and all("rel_error" in row for row in rows):
        plot = args.plot or f"{args.output.rstrip('/')}/layers.png"
        plot_layer_report(rows, plot)
    else:                                     # structured outputs (and their finetunes) have no per-layer solves
        metrics["plot_skipped"] = "the output has no per-layer errors to plot (structured pruning alone)"
    if manifest.get("structured"):
        metrics["structured"] = {r["name"]: f"{r['groups']} -> {r['kept']}" for r in manifest["structured"]}
    print(json.dumps({**metrics, "sparsity": manifest["sparsity"], "plot": plot}, indent=1))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    """Finetune a pruning output on Ray Train as the recipe's finetune section says; the output goes to
    --output, by default beside the student as <student>-finetuned."""
    from cap_dist.config import load_recipe
    from cap_dist.finetune.trainer import default_output, finetune

    recipe = load_recipe(args.config, args.overrides)
    output = args.output or default_output(args.student)
    summary = finetune(recipe, args.student, output, step_index=args.step_index)
    metrics = summary.get("metrics") or {}
    top1 = f", eval top-1 {metrics['eval_top1']:.2%}" if metrics.get("eval_top1") is not None else ""
    print(f"wrote {output}: {summary['steps']} steps in {summary['epochs']} epochs at {summary['sparsity']:.2%} "
          f"sparsity{top1} (run {summary['run_name']}, {summary['attempts']} attempt(s))")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """Gradual pruning: prune and finetune along the recipe's schedule up to prune.sparsity."""
    from cap_dist.config import load_recipe
    from cap_dist.finetune.gradual import run_gradual

    recipe = load_recipe(args.config, args.overrides)
    summary = run_gradual(recipe)
    for row in summary["steps"]:
        top1 = (row.get("finetune") or {}).get("eval_top1")
        print(f"step {row['step']}: {row['sparsity']:.2%} sparsity, prune {row['prune_seconds']:.0f} s"
              f"{' (reused)' if row['prune_reused'] else ''}, finetune {row['finetune_seconds']:.0f} s"
              f"{' (reused)' if row['finetune_reused'] else ''}"
              + (f", eval top-1 {top1:.2%}" if top1 is not None else ""))
    print(f"final model: {summary['final']} ({len(summary['steps'])} steps in {summary['seconds']:.0f} s)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """Write the compact file (kept values + packed bitmask, or codes + scales) beside a pruning output."""
    from cap_dist.compact import compact_from_output

    sizes = compact_from_output(args.output)
    print(f"wrote {sizes['path']}: {sizes['compact_bytes']:,} bytes, {sizes['ratio']:.1%} of the dense "
          f"{sizes['dense_bytes']:,} ({sizes['layers']} sparse layers, {sizes['quantized_layers']} as integer codes); "
          "restores the dense weights bit-exactly (cap_dist.compact.load_compact)")
    return 0


def _cmd_onnx(args: argparse.Namespace) -> int:
    """Export a pruning output to ONNX and check ONNX Runtime against torch (and an int8 graph with --int8)."""
    from cap_dist.deploy import export_output, quantize_int8

    path, check = export_output(args.output, args.out)
    print(f"wrote {path}: ONNX Runtime matches torch on a {list(check.input_shape)} batch (max |diff| "
          f"{check.max_abs_diff:.2e} at output scale {check.max_abs_output:.2g})")
    if args.int8:
        int8 = quantize_int8(path, path.removesuffix(".onnx") + ".int8.onnx")
        print(f"wrote {int8}: int8 MatMul/Gemm weights (ONNX Runtime dynamic quantization)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """The demo; Ctrl-C ends it with one line (the demo has shut its Ray down by then), not a traceback."""
    import os

    from cap_dist.demo import close_progress_bars, run_demo

    if not args.verbose:          # the engines' INFO lines (actor memory, run names) would bury the demo's own
        logging.getLogger("cap_dist").setLevel(logging.WARNING)
    try:
        run_demo(sparsity=args.sparsity, photos=args.photos, output=args.output, quick=args.quick)
    except KeyboardInterrupt:
        close_progress_bars()
        print(f"\ncap-dist demo: interrupted; Ray is shut down, partial outputs stay in {args.output}",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Skip the interpreter's teardown: Ctrl-C also reached Ray's own processes, and finalising Ray's
        # half-stopped core-worker threads once crashed the interpreter (SIGSEGV) after this line. Every output
        # file is already committed (written under a temporary name, then renamed).
        os._exit(130)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cap-dist", description="Correlation-Aware Pruning of vision models.")
    parser.add_argument("--version", action="version", version=f"cap-dist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a model as a recipe says")
    prune.add_argument("--config", required=True, help="recipe YAML (path or URI)")
    prune.add_argument("overrides", nargs="*", help="key=value overrides, e.g. prune.sparsity=0.75")
    prune.set_defaults(func=_cmd_prune)

    tune = sub.add_parser("finetune", help="recover a pruned model's accuracy: Ray Train + FSDP2, masks kept, "
                                           "distillation from the dense model")
    tune.add_argument("--config", required=True, help="recipe YAML with a finetune section (path or URI)")
    tune.add_argument("--student", required=True, help="pruning output folder or URI to finetune")
    tune.add_argument("--output", help="where to write the finetuned model (default: <student>-finetuned)")
    tune.add_argument("--step-index", type=int, default=0, help="pruning step this run recovers (run name)")
    tune.add_argument("overrides", nargs="*", help="key=value overrides, e.g. finetune.epochs=3")
    tune.set_defaults(func=_cmd_finetune)

    run = sub.add_parser("run", help="gradual pruning: prune, finetune, prune further ... along the recipe's "
                                     "schedule (one-shot + finetune with schedule.steps=1)")
    run.add_argument("--config", required=True, help="recipe YAML with finetune and schedule sections")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. schedule.steps=3")
    run.set_defaults(func=_cmd_run)

    export = sub.add_parser("export", help="compact file of a pruning output: kept values + bitmask (+ int codes)")
    export.add_argument("output", help="pruning output folder or URI")
    export.set_defaults(func=_cmd_export)

    onnx = sub.add_parser("onnx", help="export a pruning output to ONNX (reduced shapes of a structured prune) and "
                                       "check ONNX Runtime against torch")
    onnx.add_argument("output", help="pruning output folder")
    onnx.add_argument("--out", default=None, help="ONNX file to write (default: <output>/model.onnx)")
    onnx.add_argument("--int8", action="store_true", help="also write <name>.int8.onnx (ORT dynamic int8)")
    onnx.set_defaults(func=_cmd_onnx)

    evaluate = sub.add_parser("eval", help="evaluate a pruned output against its dense model")
    evaluate.add_argument("output", help="pruning output folder or URI")
    evaluate.add_argument("--data", help="evaluation images (default: the recipe's evaluation section)")
    evaluate.add_argument("--subset", nargs=2, type=int, metavar=("START", "STOP"))
    evaluate.add_argument("--samples", type=int)
    evaluate.add_argument("--kind", choices=["classifier", "encoder"], default="classifier")
    evaluate.add_argument("--no-dense", action="store_true", help="skip the comparison with the dense model")
    evaluate.add_argument("--plot", help="PNG of per-layer sparsity and error (default: OUTPUT/layers.png)")
    evaluate.set_defaults(func=_cmd_eval)

    demo = sub.add_parser("demo", help="the whole job on a local Ray: prune pretrained EfficientNet-Lite0 with 2 "
                                       "PruneActors (sparsegpt, cap), recover cap on Ray Train (2 FSDP2 workers), "
                                       "compare with dense")
    demo.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity in (0, 1)")
    demo.add_argument("--photos", action="store_true",
                      help="use the photos bundled in scikit-image/scikit-learn even where ../shared exists")
    demo.add_argument("--output", default="runs/demo", help="the demo's folder (default: runs/demo)")
    demo.add_argument("--quick", action="store_true",
                      help="the same job on a handful of images and 2 training steps (smoke test; numbers mean little)")
    demo.set_defaults(func=_cmd_demo)

    layers = sub.add_parser("layers", help="list a model's prunable layers")
    layers.add_argument("model", help="model folder/URI (model.json + model.safetensors), timm:NAME, or pypi:...")
    layers.add_argument("--targets", nargs="*", help="fnmatch patterns of layers to prune")
    layers.add_argument("--ignore", nargs="*", help="fnmatch patterns of layers to keep dense")
    layers.set_defaults(func=_cmd_layers)

    solve = sub.add_parser("solve", help="prune one layer from a saved weight and Hessian")
    solve.add_argument("--weight", required=True, help="safetensors path or URI holding the weight")
    solve.add_argument("--hessian", required=True, help="safetensors path or URI holding H [in, in] or Fisher blocks")
    solve.add_argument("--weight-key", default="weight")
    solve.add_argument("--hessian-key", default="hessian")
    solve.add_argument("--method", default="cap", choices=["cap", "sparsegpt", "obs", "wanda", "magnitude"])
    solve.add_argument("--sparsity", type=float, default=0.5)
    solve.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M such as 2:4")
    solve.add_argument("--block-size", type=int, default=None, help="cap: columns per block (default: whole rows)")
    solve.add_argument("--damp", type=float, default=0.01, help="relative damping")
    solve.add_argument("--out", required=True, help="where to write the pruned weight and mask (safetensors)")
    solve.set_defaults(func=_cmd_solve)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, a scheduler, ``kill``): unwinds like Ctrl-C, so every ``finally`` runs (actors
    and placement groups removed, finished files kept). A KeyboardInterrupt, so no ``except Exception`` swallows it
    and Ray's signal check inside ``ray.wait`` lets it through (any other exception raised there comes out as a
    SystemError)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _stopped(command: str, reason: str) -> str:
    resume = (" finished layers are kept; run the same command again to resume" if command in ("prune", "run")
              else " run the same command again to resume from the last checkpoint" if command == "finetune" else "")
    return f"cap-dist {command}: stopped by {reason};{resume}".rstrip(";")


def _stop_own_ray() -> None:
    """A local Ray this process started goes first (its workers stop forwarding log lines), so the one line that
    says why the run stopped is the last; a cluster the process joined is left alone."""
    if "ray" in sys.modules:
        from cap_dist.engines.distributed.local_ray import stop_started

        stop_started()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    from cap_dist import storage

    storage.configure()     # AWS_ENDPOINT_URL(_S3) reaches the recipe read too; the recipe's storage section follows
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.func(args)
    except Terminated:                                        # SIGTERM: one line, the shell's code for SIGTERM
        _stop_own_ray()
        print(_stopped(args.command, "SIGTERM"), file=sys.stderr)
        return 143
    except KeyboardInterrupt:                                 # Ctrl-C: one line, the shell's code for SIGINT
        _stop_own_ray()
        print(_stopped(args.command, "Ctrl-C"), file=sys.stderr)
        return 130
    except (ValueError, ImportError, OSError) as exc:       # bad input: what was wrong and what to do
        if args.verbose:
            raise
        print(f"cap-dist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:                               # a run that failed (actors lost, training failed)
        if args.verbose:
            raise
        print(f"cap-dist {args.command}: failed: {exc} (rerun with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
