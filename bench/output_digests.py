"""Digests of the masks and weights a set of prunes writes on the shared models, to show that a refactor changes
no output: record them with the old tree, record them with the new one, compare.

    git worktree add /tmp/old <commit>
    (cd /tmp/old && PYTHONPATH=/tmp/old python $OLDPWD/bench/output_digests.py record /tmp/before)   # old code
    python bench/output_digests.py record /tmp/after

(Ray puts the driver's working folder first on its workers' path: run the old code from its own checkout.)
    python bench/output_digests.py compare /tmp/before /tmp/after

Each case writes one JSON: the sha256 of every tensor of the output, each layer's (sparsity, loss, target), the
recipe hash and the engine. The cases cover both engines, both modes, global allocation, N:M, GPTQ on top and
Fisher curvature on vit4mnist and EfficientNet-Lite0. Works with the entry point of either layout
(``cap_dist.engines.prune``, or the earlier ``cap_dist.pipeline.prune`` / ``prune_distributed``). Needs
``../shared``; about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LOCAL_ONLY = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
              "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
              "AWS_EC2_METADATA_DISABLED": "true", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}

VIT = [f"model.source={SHARED}/models/vit4mnist", f"calibration.uri={SHARED}/data/mnist", "calibration.samples=128",
       "calibration.batch_size=64"]
EFFNET = [f"model.source={SHARED}/models/tf_efficientnet_lite0", f"calibration.uri={SHARED}/data/imagenet-samples",
          "calibration.samples=32", "calibration.batch_size=16"]
CASES: dict[str, tuple[str, list[str]]] = {
    "vit_local_sequential_cap": ("vit4mnist", VIT + ["engine=local"]),
    "vit_local_independent_global": ("vit4mnist", VIT + ["engine=local", "prune.mode=independent",
                                                         "prune.allocation=global", "prune.sparsity=0.6"]),
    "vit_local_sparsegpt_2to4": ("vit4mnist", VIT + ["engine=local", "prune.method=sparsegpt", "prune.pattern='2:4'"]),
    "vit_local_cap_int8": ("vit4mnist", VIT + ["engine=local", "prune.quantize.bits=8", "prune.true_sequential=false"]),
    "vit_local_fisher": ("vit4mnist", VIT + ["engine=local", "prune.curvature=fisher", "calibration.samples=16",
                                             "prune.mode=independent"]),
    "vit_ray_independent_global": ("vit4mnist", VIT + ["engine=ray", "prune.mode=independent",
                                                       "prune.allocation=global", "prune.sparsity=0.6",
                                                       "distributed.actors=2"]),
    "vit_ray_sequential": ("vit4mnist", VIT + ["engine=ray", "distributed.actors=2"]),
    "effnet_local_sequential_cap": ("effnet_lite0", EFFNET + ["engine=local"]),
    "effnet_ray_independent_2to4": ("effnet_lite0", EFFNET + ["engine=ray", "prune.mode=independent",
                                                              "distributed.actors=2", "prune.pattern='2:4'"]),
}


def _prune(recipe: Any) -> None:
    try:
        from cap_dist.engines import prune
    except ImportError:                                  # the layout before cap_dist.engines
        if recipe.engine == "local":
            from cap_dist.pipeline import prune  # type: ignore[no-redef]
        else:
            from cap_dist.distributed.driver import prune_distributed as prune  # type: ignore[no-redef]
    prune(recipe)


def digest_case(case: str, out: str) -> dict[str, Any]:
    from safetensors.torch import load as load_safetensors

    from cap_dist.config import load_recipe

    job, overrides = CASES[case]
    _prune(load_recipe(str(ROOT / "jobs" / f"{job}.yaml"), overrides + [f"output={out}"]))
    manifest = json.loads(Path(out, "sparsity.json").read_text())
    tensors: dict[str, Any] = {}
    for path in sorted(Path(out).glob("model*.safetensors")):
        tensors.update(load_safetensors(path.read_bytes()))
    return {"tensors": {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
                        for k, v in sorted(tensors.items())},
            "layers": {r["layer"]: [r["sparsity"], r["loss"], r["target_sparsity"]] for r in manifest["layers"]},
            "recipe_hash": manifest["recipe_hash"], "engine": manifest.get("engine")}


def record(folder: Path, cases: list[str]) -> None:
    import ray

    home = tempfile.mkdtemp()
    Path(home, "ray_bootstrap_config.yaml").write_text("{}\n")     # keeps Ray's dashboard off the network
    os.environ.update(LOCAL_ONLY, HOME=home)
    folder.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="r", dir="/tmp"),
             _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False)
    try:
        for case in cases:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as work:
                result = digest_case(case, f"{work}/out")
            (folder / f"{case}.json").write_text(json.dumps(result, indent=1))
            print(f"{case:<32} {len(result['tensors']):4d} tensors  {time.perf_counter() - start:6.1f} s", flush=True)
    finally:
        ray.shutdown()


def compare(before: Path, after: Path) -> int:
    print(f"{'case':<32} {'tensors':>8} {'layers':>7} {'hash':>5}  engine")
    differ = 0
    for path in sorted(before.glob("*.json")):
        a, b = json.loads(path.read_text()), json.loads((after / path.name).read_text())
        same = [a["tensors"] == b["tensors"], a["layers"] == b["layers"], a["recipe_hash"] == b["recipe_hash"]]
        differ += not all(same)
        marks = ["same" if x else "DIFF" for x in same]
        print(f"{path.stem:<32} {marks[0]:>8} {marks[1]:>7} {marks[2]:>5}  {a['engine']} -> {b['engine']}")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("folder", type=Path)
    rec.add_argument("cases", nargs="*", choices=[[], *CASES], default=[])
    cmp = sub.add_parser("compare")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        parser.error(f"needs the shared models and data at {SHARED}")
    if args.command == "record":
        record(args.folder, args.cases or list(CASES))
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
