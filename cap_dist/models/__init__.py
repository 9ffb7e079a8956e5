"""Models: load a timm model from a folder of ``model.json`` + safetensors, choose its prunable layers,
and capture their calibration inputs as curvature accumulators."""

from cap_dist.models.capture import capture_layer_inputs, flattened_weight, layer_columns, set_flattened_weight
from cap_dist.models.spec import ModelLoadError, ModelSpec, build_model, find_prunable_layers, load_model_dir

__all__ = [
    "ModelLoadError",
    "ModelSpec",
    "build_model",
    "capture_layer_inputs",
    "find_prunable_layers",
    "flattened_weight",
    "layer_columns",
    "load_model_dir",
    "set_flattened_weight",
]
