"""Models: load a timm model from a folder of ``model.json`` + safetensors, choose its prunable layers,
and capture their calibration inputs as curvature accumulators."""

from cap_dist.models.capture import capture_layer_inputs, flattened_weight, layer_columns, set_flattened_weight
from cap_dist.models.families import (
    GluedBlock,
    ModelBlocks,
    ModelFamily,
    UnsupportedModelError,
    block_of,
    check_split,
    default_layer_patterns,
    detect_family,
    families,
    group_layers,
    register_family,
    select_prunable_layers,
    split_blocks,
)
from cap_dist.models.spec import ModelLoadError, ModelSpec, build_model, find_prunable_layers, load_model_dir

__all__ = [
    "GluedBlock",
    "ModelBlocks",
    "ModelFamily",
    "ModelLoadError",
    "ModelSpec",
    "UnsupportedModelError",
    "block_of",
    "build_model",
    "capture_layer_inputs",
    "check_split",
    "default_layer_patterns",
    "detect_family",
    "families",
    "find_prunable_layers",
    "flattened_weight",
    "group_layers",
    "layer_columns",
    "load_model_dir",
    "register_family",
    "select_prunable_layers",
    "set_flattened_weight",
    "split_blocks",
]
