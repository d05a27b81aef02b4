"""ftjax: fine-tuning and post-training of decoder LMs in JAX/Flax."""

from ftjax.config import LoraConfig, ModelConfig, PRESETS, PrefixConfig, get_preset
from ftjax.hf import CheckpointError, load_pretrained, save_pretrained
from ftjax.model import Decoder, init_cache, init_params, logical_axes
from ftjax import heads, lora, losses, partition, quant, rewards, rollout, tokenizer
from ftjax.lora import merge
from ftjax.adapters import load_adapters, save_adapters
from ftjax.peft_io import load_adapter, save_adapter
from ftjax.quant import QuantConfig
from ftjax.sampling import GenerateOutput, generate

__version__ = "0.1.0"

__all__ = [
    "heads", "lora", "losses", "partition", "quant", "rewards", "rollout", "tokenizer",
    "ModelConfig", "PRESETS", "get_preset", "CheckpointError", "load_pretrained",
    "save_pretrained", "Decoder", "init_cache", "init_params", "logical_axes",
    "GenerateOutput", "generate", "LoraConfig", "QuantConfig", "load_adapter", "merge",
    "save_adapter", "PrefixConfig", "load_adapters", "save_adapters",
]
