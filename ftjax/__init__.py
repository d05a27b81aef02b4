"""ftjax: fine-tuning and post-training of decoder LMs in JAX/Flax."""

from ftjax.config import ModelConfig, PRESETS, get_preset
from ftjax.hf import CheckpointError, load_pretrained, save_pretrained
from ftjax.model import Decoder, init_cache, init_params, logical_axes
from ftjax import tokenizer
from ftjax.sampling import GenerateOutput, generate

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "PRESETS", "get_preset", "CheckpointError", "load_pretrained",
    "save_pretrained", "Decoder", "init_cache", "init_params", "logical_axes",
    "GenerateOutput", "generate",
]
