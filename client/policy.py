"""The data owner's privacy policy: the node's own rules, whatever the server asks.

A deployed node's policy comes from its operator (`fedtune client` flags, or a TOML policy file
with the same kebab-case keys, passed to the SuperNode as node config). Every field carries its
help text, from which `fedtune client`'s flags are made. In simulation the researcher is both
server and data owner, so each virtual node takes the permissive policy that matches the run
(`NodePolicy.simulated`). What the rules refuse is decided in `client/admission.py`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.config import ACCOUNTANTS, EMBEDDED_MODEL, RunConfig
from fedtune.common.errors import InputError
from fedtune.common.settings import FLAG_TYPES, build, default_of, flag_help, read_toml, setting

# Rule names, as refusals and docs/policy.md name them (the node config key that sets each rule).
REQUIRE_DP = "require-dp"
BUDGET = "budget-epsilon"
ROUND_CAP = "max-epsilon-per-round"
RUN_CAP = "max-epsilon-per-run"
MIN_NOISE = "min-noise-multiplier"
PLANNING_ROWS = "planning-rows"
REQUIRE_SECAGG = "require-secagg"
MIN_COHORT = "min-cohort"
MIN_THRESHOLD = "min-threshold"
SHARE_EVALUATION = "share-evaluation"
MODELS = "models"
MAX_LENGTH = "max-length"
MAX_PHYSICAL_BATCH = "max-physical-batch"
MAX_STEPS = "max-steps"
MAX_RUN_STEPS = "max-run-steps"
MAX_LORA_RANK = "max-lora-rank"
MAX_ADAPTER_VALUE = "max-adapter-value"
TASK = "task"  # a request for another task than the node's data holds
LABELS_JSON = "labels-json"
PEERS = "peers"

UNLIMITED = 2**62  # a simulated node's size limits: the researcher is both sides

# Keys a policy file may still hold from earlier releases.
RENAMED = {"max-delta": "`delta` (the one delta this node accounts at; it no longer follows "
                        "the node's row count)"}
RETIRED = {"report-epsilon": "a node's epsilon is now always reported: it follows only public "
                             "values (the request and this policy), never the data set's size"}


class PolicyError(InputError, ValueError):
    """The node's own policy is incomplete or out of range; the message names the setting."""


@dataclass(frozen=True)
class NodePolicy:
    """The data owner's rules; defaults are the strict ones a deployed node starts from."""

    require_dp: bool = setting("refuse any round without sample-level DP-SGD", True,
                               flag="--allow-no-dp", invert=True,
                               flag_help="waive the rule that every round uses sample-level "
                                         "DP-SGD")
    budget_epsilon: float | None = setting(
        "total epsilon this node's data may spend over every run (required unless "
        "--allow-no-dp)", None)
    delta: float = setting("the delta this node accounts at, whatever the server asks; must be "
                           "below n^-1.1 for its n rows (checked at start-up)", 1e-5)
    planning_rows: int = setting(
        "the row count this node plans DP-SGD for (sample rate = batch / planning rows); "
        "public, the server can infer it; 0 = the server's privacy.planning_rows", 0)
    max_epsilon_per_round: float = setting(
        "most epsilon one round may cost; 0 = half the budget", 0.0)
    max_epsilon_per_run: float = setting(
        "most epsilon one run may plan to cost; 0 = half the budget", 0.0)
    min_noise_multiplier: float = setting("smallest DP-SGD noise multiplier accepted", 0.5)
    accountant: str = setting("this node's ledger's accountant: empty = its own, prv for a new "
                              "one", "")
    require_secagg: bool = setting("refuse to send an update the server could read alone", True,
                                   flag="--allow-no-secagg", invert=True,
                                   flag_help="allow updates sent without secure aggregation")
    min_cohort: int = setting("fewest clients summed by secure aggregation", 3)
    min_threshold: int = setting("lowest secure-aggregation threshold accepted", 2)
    share_evaluation: bool = setting(
        "answer the server's evaluation of the held-out rows: the server chooses the adapter, "
        "so it chooses the question; each answer is noised and spent from the ledger", False)
    evaluation_noise: float = setting(
        "standard deviation, in rows, of the Gaussian noise on each count an evaluation answer "
        "carries", 5.0)
    models: list[str] = dataclasses.field(
        default_factory=lambda: [EMBEDDED_MODEL],
        metadata={"help": "the models this node loads (the server may ask no other)"})
    allow_hub: bool = setting("let this node download a model from a hub (off: local files only)",
                              False)
    max_length: int = setting("most tokens per row the server may ask for (and never more than "
                              "the model's positions)", 512)
    max_physical_batch: int = setting("most rows per forward pass the server may ask for "
                                      "(train.physical_batch; train.batch_size outside DP-SGD)",
                                      256)
    max_steps: int = setting("most optimizer steps one round may take", 1000)
    max_run_steps: int = setting(
        "most DP-SGD steps one run may plan over all its rounds (client-level DP: its rounds), "
        "checked before any accountant composes them", 20000)
    max_lora_rank: int = setting("largest LoRA rank the server may ask for", 64)
    max_adapter_value: float = setting("largest |value| of a received adapter", 1000.0)
    test_fraction: float = setting("share of this node's rows held out (each row's side set by "
                                   "a keyed hash of its content)", 0.2)
    split_seed: int = setting("this node's key for that split (never the server's seed)", 0)
    text_field: str = setting("field holding the text", "text")
    label_field: str = setting("field holding the label", "label")
    peers: str = setting("the consortium's <name>.pub node keys: sign secure aggregation with "
                         "this node's key and refuse any cohort with a key not pinned there", "")
    require_peers: bool = setting(
        "refuse secure aggregation without pinned peers (`peers`)", True,
        flag="--allow-unpinned-peers", invert=True,
        flag_help="waive pinning the consortium's keys (--peers): a server could then make up "
                  "cohort members (printed as a warning); client-level DP is refused anyway")
    max_dropout: float = setting("largest share of neighbours whose secure-aggregation shares "
                                 "may be missing when it masks", 0.2)

    def __post_init__(self) -> None:
        budget = self.budget_epsilon
        _check(budget is None or 0 < budget < math.inf, BUDGET, "must be finite and > 0",
               budget)
        _check(not self.require_dp or budget is not None, BUDGET,
               "is required: give --budget-epsilon (or waive DP explicitly with --allow-no-dp)",
               budget)
        _check(0 < self.delta < 1, "delta", "must be in (0, 1)", self.delta)
        _check(self.planning_rows >= 0, PLANNING_ROWS, "must be >= 0", self.planning_rows)
        for name, cap in ((ROUND_CAP, self.max_epsilon_per_round),
                          (RUN_CAP, self.max_epsilon_per_run)):
            _check(0 <= cap < math.inf, name, "must be finite and >= 0 (0 = half the budget)",
                   cap)
        _check(self.min_noise_multiplier >= 0, MIN_NOISE, "must be >= 0",
               self.min_noise_multiplier)
        _check(self.accountant in ("", *ACCOUNTANTS), "accountant",
               f"must be empty or one of {', '.join(ACCOUNTANTS)}", self.accountant)
        _check(self.min_cohort >= 3, MIN_COHORT,
               "must be >= 3 (with two, each learns the other's update from the sum)",
               self.min_cohort)
        _check(self.min_threshold >= 2, MIN_THRESHOLD, "must be >= 2", self.min_threshold)
        _check(self.evaluation_noise >= 0 and math.isfinite(self.evaluation_noise),
               "evaluation-noise", "must be finite and >= 0", self.evaluation_noise)
        _check(bool(self.models) and all(self.models), MODELS, "must name at least one model",
               self.models)
        for name, value in ((MAX_LENGTH, self.max_length),
                            (MAX_PHYSICAL_BATCH, self.max_physical_batch),
                            (MAX_STEPS, self.max_steps), (MAX_RUN_STEPS, self.max_run_steps),
                            (MAX_LORA_RANK, self.max_lora_rank)):
            _check(value >= 1, name, "must be >= 1", value)
        _check(0 < self.max_adapter_value < math.inf, MAX_ADAPTER_VALUE,
               "must be finite and > 0", self.max_adapter_value)
        _check(0 <= self.test_fraction < 1, "test-fraction", "must be in [0, 1)",
               self.test_fraction)
        _check(0 <= self.max_dropout < 1 / 3, "max-dropout", "must be in [0, 1/3)",
               self.max_dropout)

    @classmethod
    def simulated(cls, config: RunConfig, client_name: str) -> NodePolicy:
        """A virtual node's policy: whatever the researcher's run asks, within its budget."""
        privacy = config.privacy
        budget = privacy.budgets().get(client_name, privacy.epsilon)
        return cls(require_dp=False, require_secagg=False, require_peers=False,
                   budget_epsilon=budget,
                   max_epsilon_per_round=sys.float_info.max,
                   max_epsilon_per_run=sys.float_info.max,
                   min_noise_multiplier=0.0, accountant=privacy.accountant,
                   share_evaluation=True, evaluation_noise=0.0, models=[config.model.name],
                   allow_hub=True, max_length=UNLIMITED, max_physical_batch=UNLIMITED,
                   max_steps=UNLIMITED, max_run_steps=UNLIMITED, max_lora_rank=UNLIMITED,
                   max_adapter_value=sys.float_info.max,
                   test_fraction=config.partition.local_test_fraction,
                   max_dropout=min(config.secagg.dropout_tolerance, 0.33))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> NodePolicy:
        """From node-config or policy-file keys (kebab-case, as the rules are named)."""
        values = dict(values)
        renamed = sorted(set(values) & set(RENAMED))
        if renamed:
            raise PolicyError("; ".join(f"node policy `{k}` is now {RENAMED[k]}"
                                        for k in renamed))
        for key in sorted(set(values) & set(RETIRED)):
            warnings.warn(f"node policy `{key}` is ignored: {RETIRED[key]}", stacklevel=2)
            values.pop(key)
        return build(cls, values, PolicyError, key=lambda name: name.replace("_", "-"),
                     unknown_keys="unknown node policy keys")

    @staticmethod
    def read_file(path: str | Path) -> dict[str, Any]:
        """The settings of a TOML policy file (kebab-case keys), for flags to override."""
        return read_toml(path, "node policy file", PolicyError)

    def to_node_config(self) -> dict[str, Any]:
        """kebab-case keys for `flower-supernode --node-config` (a missing budget is omitted,
        a list is joined by commas)."""
        values = {f.name.replace("_", "-"): getattr(self, f.name)
                  for f in dataclasses.fields(self)}
        return {k: ",".join(v) if isinstance(v, list) else v
                for k, v in values.items() if v is not None}

    def budget(self) -> float:
        """This node's epsilon budget; unlimited only where its operator waived DP."""
        return math.inf if self.budget_epsilon is None else self.budget_epsilon

    def round_cap(self) -> float:
        """The most epsilon one round may cost."""
        return self.max_epsilon_per_round or self.budget() / 2

    def run_cap(self) -> float:
        """The most epsilon one run may plan to cost."""
        return self.max_epsilon_per_run or self.budget() / 2


@dataclass(frozen=True)
class PolicyFlag:
    """One `fedtune client` flag, made from a policy setting."""

    name: str  # --budget-epsilon
    key: str  # budget-epsilon: the setting's node-config key
    dest: str  # the argparse destination
    kind: type  # how the flag's value is read (str for a list: comma-separated)
    const: bool | None  # a switch stores this; None for a flag that takes a value
    help: str


def policy_flags() -> list[PolicyFlag]:
    """The flags of every policy setting: a switch for a boolean (`--allow-no-dp` where the
    strict default is on), a value otherwise; help text and default from the field."""
    flags = []
    for field in dataclasses.fields(NodePolicy):
        key, meta = field.name.replace("_", "-"), field.metadata
        if str(field.type) == "bool":
            flags.append(PolicyFlag(meta.get("flag", f"--{key}"), key, field.name, bool,
                                    not default_of(field), meta.get("flag_help", meta["help"])))
        else:
            flags.append(PolicyFlag(f"--{key}", key, field.name, FLAG_TYPES[str(field.type)],
                                    None, flag_help(field, say_unset=True)))
    return flags


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise PolicyError(f"node policy `{name}` {rule}, got {value!r}")
