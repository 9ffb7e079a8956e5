"""Structured pruning: whole MLP hidden units, attention heads and expansion channels removed with exact group OBS
updates (:mod:`cap_dist.solvers.structured`), allocated across the model by loss per saved MAC, leaving a physically
smaller timm model (:mod:`cap_dist.models.structures`)."""
