"""Recipe sections for recovery: sparse finetuning on Ray Train and CAP's gradual pruning schedule.

    finetune:                      # one Ray Train run after every pruning step
      data: {uri: ../shared/data/mnist, subset: [0, 8000], batch_size: 64}
      epochs: 2                    # per pruning step
      lr: 1.0e-4                   # peak; linear decay restarted at every pruning step (cyclic linear)
      distill: {weight: 1.0, temperature: 2.0}
      workers: 2
      storage_path: s3://bucket/runs   # checkpoints (torch distributed checkpoint) via ray.train.report
    schedule:                      # gradual pruning: start → prune.sparsity in `steps` steps
      start: 0.4
      steps: 4
      curve: cubic

Kept free of Ray and torch so a recipe validates anywhere.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


def schedule_sparsities(schedule: ScheduleConfig, final: float) -> list[float]:
    """The target sparsity of every pruning step, increasing, ending at ``final``."""
    if not schedule.start < final:
        raise ValueError(f"schedule.start={schedule.start} must be below the final sparsity {final}")
    if schedule.first is not None and not schedule.start < schedule.first <= final:
        raise ValueError(f"schedule.first={schedule.first} must lie in ({schedule.start}, {final}]")
    if schedule.steps == 1:
        return [round(final, 6)]
    anchor, head, n = schedule.start, [], schedule.steps
    if schedule.first is not None:
        anchor, head, n = schedule.first, [schedule.first], schedule.steps - 1
    steps = []
    for k in range(1, n + 1):
        frac = k / n
        if schedule.curve == "cubic":
            steps.append(final + (anchor - final) * (1.0 - frac) ** 3)
        else:
            steps.append(anchor + (final - anchor) * frac)
    steps[-1] = final
    return [round(s, 6) for s in head + steps]
