"""`fedtune export RUN_DIR OUT_DIR`: a run's model as a Hugging Face model directory that
`transformers` alone loads: LoRA merged into the base, the tokenizer, the data's label names.

- a classifier whose head reads the pooler: a standard `...ForSequenceClassification` directory;
- the mean-pooling classifier: its code ships in the directory (`modeling_mean_pooling.py`, named
  in `config.json`'s `auto_map`), loaded with `trust_remote_code=True`;
- a causal LM: a standard `AutoModelForCausalLM` directory.

The weights are the run's last checkpoint (the round its `metrics.jsonl` ends with), or, for a run
without checkpoints (`fedtune centralized`), its saved `adapter/`. `fedtune.json` beside them says
how the model read its rows (task, text field, max length, prompt template), for `fedtune predict`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.common import modeling_mean_pooling
from fedtune.common.adapter import load_saved_adapter, load_trainable_state, public_name
from fedtune.common.config import CAUSAL_LM, RunConfig
from fedtune.common.data import load_data
from fedtune.common.errors import InputError
from fedtune.common.mean_pooling import MeanPoolingClassifier
from fedtune.common.model import load_tokenizer, resolve_model_path
from fedtune.common.run_dir import ADAPTER_DIR, CONFIG_FILE, saved_config
from fedtune.common.task import build_model
from fedtune.server.checkpoint import latest_checkpoint
from fedtune.server.metrics_log import read_label_names, read_rounds

READING_FILE = "fedtune.json"  # how the exported model reads a row (ReadingSettings)
MEAN_POOLING_AUTO_MAP = {
    "AutoConfig": "modeling_mean_pooling.MeanPoolingConfig",
    "AutoModelForSequenceClassification":
        "modeling_mean_pooling.MeanPoolingForSequenceClassification",
}


class ExportError(InputError, ValueError):
    """A run directory cannot be exported (or the output directory cannot take it)."""


@dataclass(frozen=True)
class ReadingSettings:
    """How the model read its rows in training, so that new rows are read the same way."""

    task: str
    text_field: str
    max_length: int
    prompt_template: str
    base_model: str | None = None  # what the run fine-tuned (a hub id or a path)
    run_accuracy: float | None = None  # the run's last reported accuracy, for the record

    @classmethod
    def of(cls, config: RunConfig, **extra: Any) -> ReadingSettings:
        return cls(task=config.model.task, text_field=config.data.text_field,
                   max_length=config.model.max_length,
                   prompt_template=config.data.prompt_template, **extra)

    @classmethod
    def read(cls, path: Path) -> ReadingSettings:
        values = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


@dataclass(frozen=True)
class TrainedModel:
    """A run's model with its adapter merged: a plain transformers model, in eval mode."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    reading: ReadingSettings


def read_run_config(run_dir: Path) -> RunConfig:
    """The configuration a run saved (to resume or export it); a run saved before `model.pooling`
    existed read the pooler."""
    config = saved_config(run_dir)
    if config is None:
        raise ExportError(f"{run_dir} holds no fedtune run (no {CONFIG_FILE})")
    return config


def trained_model(run_dir: Path) -> TrainedModel:
    """Rebuild the run's model, load its final adapter and merge it into the base."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    # A quantised base would merge lossily: the export holds full-precision weights.
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, quantize="none"))
    names = _label_names(run_dir, config)
    peft_model = build_model(config, len(names))
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        load_trainable_state(peft_model, checkpoint.arrays)
    elif (run_dir / ADAPTER_DIR).is_dir():
        load_saved_adapter(peft_model, run_dir / ADAPTER_DIR)
    else:
        raise ExportError(f"{run_dir} has neither a checkpoint nor an {ADAPTER_DIR}/ to export "
                          "(did the run complete a round?)")
    merged = peft_model.merge_and_unload()
    if isinstance(merged, MeanPoolingClassifier):
        merged = _as_transformers_model(merged)
    if names:
        merged.config.id2label = dict(enumerate(names))
        merged.config.label2id = {name: index for index, name in enumerate(names)}
        merged.config.problem_type = "single_label_classification"
    rounds = read_rounds(run_dir)
    reading = ReadingSettings.of(
        config, base_model=public_name(resolve_model_path(config.model.name)),
        run_accuracy=rounds[-1]["accuracy"] if rounds else None)
    tokenizer = load_tokenizer(config.model.name)
    tokenizer.model_max_length = config.model.max_length  # truncation=True cuts where training did
    return TrainedModel(model=merged.eval(), tokenizer=tokenizer, reading=reading)


def export_run(run_dir: Path, out_dir: Path) -> Path:
    """Write the run's merged model to `out_dir` (which must not hold anything yet)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} already exists and is not empty; choose another directory")
    trained = trained_model(run_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        trained.model.save_pretrained(staging)
        trained.tokenizer.save_pretrained(staging)
        if isinstance(trained.model, modeling_mean_pooling.MeanPoolingForSequenceClassification):
            shutil.copyfile(modeling_mean_pooling.__file__, staging / "modeling_mean_pooling.py")
        text = json.dumps(dataclasses.asdict(trained.reading), indent=1, sort_keys=True)
        (staging / READING_FILE).write_text(text + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        staging.rename(out_dir)  # the directory appears complete or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _as_transformers_model(merged: MeanPoolingClassifier,
                           ) -> modeling_mean_pooling.MeanPoolingForSequenceClassification:
    """The same weights under the class that ships with the export (identical module names)."""
    encoder = merged.encoder.config.to_dict()
    encoder.pop("_name_or_path", None)  # a path on this machine
    config = modeling_mean_pooling.MeanPoolingConfig(
        encoder=encoder, num_labels=merged.num_labels,
        auto_map=MEAN_POOLING_AUTO_MAP,
        architectures=[modeling_mean_pooling.MeanPoolingForSequenceClassification.__name__])
    model = modeling_mean_pooling.MeanPoolingForSequenceClassification(config)
    model.load_state_dict(merged.state_dict(), strict=True)
    return model


def _label_names(run_dir: Path, config: RunConfig) -> list[str]:
    """The run's label names (labels.json); an older run's from its data; none for a causal LM."""
    if config.model.task == CAUSAL_LM:
        return []
    return read_label_names(run_dir) or load_data(config.data, config.seed,
                                                  config.model.task).label_names
