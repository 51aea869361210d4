"""Models: HuggingFace transformers built from presets, config JSON or checkpoints."""
from pipeline.models.build import build_model, check_objective, load_model_config, max_positions
from pipeline.models.presets import PRESETS

__all__ = ["PRESETS", "build_model", "check_objective", "load_model_config", "max_positions"]
