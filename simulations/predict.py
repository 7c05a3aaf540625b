"""`fedtune predict RUN_DIR|MODEL_DIR --input FILE`: a trained model's answer for every row of a
JSONL or CSV file, one JSON line per row, in order: `{"label": name, "score": probability}` from a
classifier, `{"generated": text}` from a causal LM. Rows are read as training read them (the text
field, max length, prompt template), in batches, on CUDA when present.

A model directory of the mean-pooling head is loaded with the class installed here, never with the
copy of its code inside the directory (`trust_remote_code` stays off).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from fedtune.common.causal_lm import LMCollator
from fedtune.common.config import CAUSAL_LM, CLASSIFICATION, DEFAULT_PROMPT
from fedtune.common.data import file_records
from fedtune.common.errors import InputError
from fedtune.common.model import pick_device
from fedtune.common.modeling_mean_pooling import (
    MeanPoolingConfig,
    MeanPoolingForSequenceClassification,
)
from fedtune.common.run_dir import ADAPTER_DIR, CHECKPOINT_DIR
from fedtune.simulations.export import READING_FILE, ReadingSettings, TrainedModel, read_run_config
from fedtune.simulations.export import trained_model as run_model

HF_CONFIG = "config.json"


class PredictError(InputError, ValueError):
    """The model source or the input rows cannot be used; the message names which and where."""


def is_run_dir(source: Path) -> bool:
    return (source / ADAPTER_DIR).is_dir() or (source / CHECKPOINT_DIR).is_dir()


def reading_of(source: Path) -> ReadingSettings:
    """How `source` (a run directory or a model directory) reads rows; cheap: no model loaded."""
    if is_run_dir(source):
        return ReadingSettings.of(read_run_config(source))
    if not (source / HF_CONFIG).is_file():
        raise PredictError(f"{source} is neither a fedtune run directory (no {ADAPTER_DIR}/ or "
                           f"{CHECKPOINT_DIR}/) nor a model directory (no {HF_CONFIG})")
    if (source / READING_FILE).is_file():
        try:
            return ReadingSettings.read(source / READING_FILE)
        except (OSError, json.JSONDecodeError, TypeError, AttributeError) as error:
            raise PredictError(f"{source / READING_FILE} is unreadable: {error}") from None
    try:
        architectures = json.loads((source / HF_CONFIG).read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError, AttributeError) as error:
        raise PredictError(f"{source / HF_CONFIG} is unreadable: {error}") from None
    causal = any(str(name).endswith("ForCausalLM") for name in architectures)
    return ReadingSettings(task=CAUSAL_LM if causal else CLASSIFICATION, text_field="text",
                           max_length=512, prompt_template=DEFAULT_PROMPT)


def load_model(source: Path, reading: ReadingSettings) -> TrainedModel:
    """The model of a run directory (adapter merged) or of a model directory."""
    if is_run_dir(source):
        return run_model(source)
    try:
        model_type = json.loads((source / HF_CONFIG).read_text()).get("model_type")
        model: PreTrainedModel
        if model_type == MeanPoolingConfig.model_type:
            model = MeanPoolingForSequenceClassification.from_pretrained(source)
        elif reading.task == CAUSAL_LM:
            model = AutoModelForCausalLM.from_pretrained(source)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(source)
        # the model's own config: AutoTokenizer would otherwise look up the custom model type
        tokenizer = AutoTokenizer.from_pretrained(source, config=model.config)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise PredictError(f"model directory {source} could not be loaded: {first}") from None
    return TrainedModel(model=model.eval(), tokenizer=tokenizer, reading=reading)


def inputs_of(rows: list[dict[str, Any]], reading: ReadingSettings, where: str) -> list[str]:
    """Each row's text (a classifier) or prompt (a causal LM), as training built it."""
    if not rows:
        raise PredictError(f"{where} has no rows")
    field = reading.text_field
    texts = []
    for number, row in enumerate(rows, start=1):
        if reading.task == CAUSAL_LM and "instruction" in row:
            instruction, extra = row.get("instruction"), row.get("input") or ""
            if not isinstance(instruction, str) or not isinstance(extra, str):
                raise PredictError(f"{where} row {number}: 'instruction' and 'input' must be text")
            texts.append(reading.prompt_template.format(instruction=instruction, input=extra))
            continue
        text = row.get(field)
        if not isinstance(text, str):
            wanted = f"field {field!r}" + (" or 'instruction'" if reading.task == CAUSAL_LM
                                            else "")
            raise PredictError(f"{where} row {number}: {wanted} is missing or not text")
        texts.append(text)
    return texts


@torch.no_grad()
def classify(trained: TrainedModel, texts: list[str], device: torch.device
             ) -> list[dict[str, Any]]:
    """The most probable label of each text, by name, with its probability."""
    batch = trained.tokenizer(texts, padding=True, truncation=True,
                              max_length=trained.reading.max_length, return_tensors="pt")
    logits = trained.model(**{k: v.to(device) for k, v in batch.items()}).logits
    probabilities = torch.softmax(logits.float(), dim=-1)
    scores, labels = probabilities.max(dim=-1)
    names = trained.model.config.id2label
    return [{"label": names.get(int(label), str(int(label))), "score": round(float(score), 6)}
            for label, score in zip(labels.tolist(), scores.tolist(), strict=True)]


@torch.no_grad()
def generate(trained: TrainedModel, prompts: list[str], device: torch.device, *,
             max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy continuations of left-padded prompts, tokenised as in training (`LMCollator`)."""
    collator = LMCollator(trained.tokenizer, trained.reading.max_length)
    special = collator.special
    rows = [collator.prompt_ids(p)[-trained.reading.max_length:] or [special.eos]
            for p in prompts]
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), special.pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    out = trained.model.generate(input_ids=input_ids.to(device),
                                 attention_mask=attention.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=special.eos, pad_token_id=special.pad)
    texts = trained.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [{"generated": text.strip()} for text in texts]


def predictions(trained: TrainedModel, texts: list[str], *, batch_size: int,
                max_new_tokens: int, progress: bool = True) -> Iterator[dict[str, Any]]:
    """One answer per text, in order, batch by batch; a progress bar on stderr for long inputs."""
    device = pick_device()
    trained.model.to(device)
    bar = Progress(TextColumn("predicting"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                   disable=not progress or len(texts) <= batch_size)
    with bar:
        job = bar.add_task("rows", total=len(texts))
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            if trained.reading.task == CAUSAL_LM:
                yield from generate(trained, chunk, device, max_new_tokens=max_new_tokens)
            else:
                yield from classify(trained, chunk, device)
            bar.advance(job, len(chunk))


def predict_file(source: Path, input_file: Path, *, text_field: str | None = None,
                 batch_size: int = 32, max_new_tokens: int = 64,
                 progress: bool = True) -> Iterator[dict[str, Any]]:
    """Check the source and every input row first (cheap), then load the model and predict."""
    if batch_size < 1 or max_new_tokens < 1:
        raise PredictError(f"--batch-size and --max-new-tokens must be >= 1, got {batch_size} "
                           f"and {max_new_tokens}")
    reading = reading_of(Path(source))
    if text_field:
        reading = dataclasses.replace(reading, text_field=text_field)
    texts = inputs_of(file_records(input_file), reading, str(input_file))
    trained = load_model(Path(source), reading)
    return predictions(trained, texts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       progress=progress)
