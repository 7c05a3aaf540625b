"""What may leave this node: the data owner's privacy policy, and every reply built under it.

The server's run configuration, cohort, threshold and seeds are untrusted input. Before a round
touches data, `violations` checks what the server asks against the node's own `NodePolicy`; a
request that breaks a rule is answered by `refusal`, naming each rule, and nothing derived from
the data leaves. The metrics a node may send are built here too (`train_metrics`,
`evaluation_metrics`), so one module answers "what does this node disclose, and when".

A deployed node's policy comes from its operator (`fedtune client` flags or a policy file, passed
to the SuperNode as node config). In simulation the researcher is both server and data owner, so
each virtual node takes the permissive policy that matches the run (`NodePolicy.simulated`).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from common import record_keys as keys
from common.client_dp import client_level_plan
from common.config import ACCOUNTANTS, CLASSIFICATION, RunConfig
from common.privacy import default_delta

# Rule names, as refusals and docs/policy.md name them (the node config key that sets each rule).
REQUIRE_DP = "require-dp"
MAX_DELTA = "max-delta"
MIN_NOISE = "min-noise-multiplier"
REQUIRE_SECAGG = "require-secagg"
MIN_COHORT = "min-cohort"
MIN_THRESHOLD = "min-threshold"
SHARE_EVALUATION = "share-evaluation"
LABELS_JSON = "labels-json"
BUDGET = "budget-epsilon"
PEERS = "peers"


class PolicyError(ValueError):
    """The node's own policy is incomplete or out of range; the message names the setting."""


@dataclass(frozen=True)
class NodePolicy:
    """The data owner's rules; defaults are the strict ones a deployed node starts from."""

    require_dp: bool = True  # refuse any round without sample-level DP-SGD
    budget_epsilon: float | None = None  # total epsilon of this data set; required with DP
    max_delta: float = 0.0  # largest delta accepted; 0 = 1/(10 n) for this node's n records
    min_noise_multiplier: float = 0.5  # refuse DP-SGD with less noise per unit of clipping
    accountant: str = ""  # this node's ledger's accountant; "" = its own, prv for a new one
    require_secagg: bool = True  # refuse to send an update the server could read alone
    min_cohort: int = 3  # refuse secure aggregation with fewer clients summed
    min_threshold: int = 2  # refuse secure aggregation whose threshold is lower
    share_evaluation: bool = False  # answer the server's evaluation of its held-out rows
    report_epsilon: bool = False  # send the ledger's epsilon under secure aggregation too
    test_fraction: float = 0.2  # share of this node's rows held out from training
    text_field: str = "text"  # how this node's rows are read: never the server's field names,
    label_field: str = "label"  # which could make a data-dependent error a probe
    split_seed: int = 0  # this node's seed for that split (never the server's)
    peers: str = ""  # directory of the consortium's <name>.pub node keys: sign with this
    # node's key and accept only cohorts whose every member's key is pinned there
    require_peers: bool = True  # refuse secure aggregation without `peers` (waived loudly)
    max_dropout: float = 0.2  # largest share of its share holders whose shares may be missing
    # when it masks (a server withholding more could leave it masked by colluders alone)

    def __post_init__(self) -> None:
        _check(self.budget_epsilon is None or self.budget_epsilon > 0, BUDGET, "must be > 0",
               self.budget_epsilon)
        _check(not self.require_dp or self.budget_epsilon is not None, BUDGET,
               "is required: give --budget-epsilon (or waive DP explicitly with --allow-no-dp)",
               self.budget_epsilon)
        _check(0 <= self.max_delta < 1, MAX_DELTA, "must be in [0, 1); 0 = 1/(10 n)",
               self.max_delta)
        _check(self.min_noise_multiplier >= 0, MIN_NOISE, "must be >= 0",
               self.min_noise_multiplier)
        _check(self.accountant in ("", *ACCOUNTANTS), "accountant",
               f"must be empty or one of {', '.join(ACCOUNTANTS)}", self.accountant)
        _check(self.min_cohort >= 3, MIN_COHORT,
               "must be >= 3 (with two, each learns the other's update from the sum)",
               self.min_cohort)
        _check(self.min_threshold >= 2, MIN_THRESHOLD, "must be >= 2", self.min_threshold)
        _check(0 <= self.test_fraction < 1, "test-fraction", "must be in [0, 1)",
               self.test_fraction)
        _check(0 <= self.max_dropout < 1 / 3, "max-dropout", "must be in [0, 1/3)",
               self.max_dropout)

    @classmethod
    def simulated(cls, config: RunConfig, client_name: str) -> NodePolicy:
        """A virtual node's policy: whatever the researcher's run asks, within its budget."""
        privacy = config.privacy
        return cls(require_dp=False, require_secagg=False, require_peers=False,
                   budget_epsilon=privacy.budgets().get(client_name, privacy.epsilon),
                   max_delta=privacy.delta, min_noise_multiplier=0.0,
                   accountant=privacy.accountant, share_evaluation=True, report_epsilon=True,
                   test_fraction=config.partition.local_test_fraction,
                   max_dropout=min(config.secagg.dropout_tolerance, 0.33))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> NodePolicy:
        """From node-config or policy-file keys (kebab-case, as the rules are named)."""
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise PolicyError(f"unknown node policy keys: {', '.join(unknown)}")
        kwargs = {fields[k].name: _typed(k, v, fields[k].type) for k, v in values.items()}
        return cls(**kwargs)

    @staticmethod
    def read_file(path: str | Path) -> dict[str, Any]:
        """The settings of a TOML policy file (kebab-case keys), for flags to override."""
        try:
            with Path(path).open("rb") as handle:
                return tomllib.load(handle)
        except FileNotFoundError:
            raise PolicyError(f"node policy file {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise PolicyError(f"node policy file {path} is not readable TOML: {error}") from None

    def to_node_config(self) -> dict[str, Any]:
        """kebab-case keys for `flower-supernode --node-config` (a missing budget is omitted)."""
        values = {f.name.replace("_", "-"): getattr(self, f.name)
                  for f in dataclasses.fields(self)}
        return {k: v for k, v in values.items() if v is not None}

    def budget(self) -> float:
        """This node's epsilon budget; unlimited only where its operator waived DP."""
        return math.inf if self.budget_epsilon is None else self.budget_epsilon

    def delta_for(self, records: int) -> float:
        """The delta this node accounts at for a data set of `records` rows."""
        return self.max_delta or default_delta(records)


def request_violations(policy: NodePolicy, config: RunConfig, *, secure: bool,
                       declared_labels: bool = True) -> list[str]:
    """Rules the server's request breaks before any data is read (empty: allowed so far).

    `secure` is whether this message is a step of secure aggregation, whatever the run
    configuration claims; `declared_labels` whether the node names its label set (labels.json),
    so that a classifier head's width never follows the data's largest label."""
    broken = []
    if config.model.task == CLASSIFICATION and not declared_labels:
        broken.append(f"{LABELS_JSON}: this node trains a classifier only over the label set its "
                      "labels.json declares")
    privacy = config.privacy
    if policy.require_dp and not config.privacy.sample_level:
        asked = "privacy.dp = false" if not privacy.dp else f"privacy.level = {privacy.level!r}"
        broken.append(f"{REQUIRE_DP}: this node trains only with sample-level DP-SGD, the "
                      f"server asked {asked}")
    if privacy.client_level and (z := client_level_plan(config)[0].noise_multiplier) < \
            policy.min_noise_multiplier:
        broken.append(f"{MIN_NOISE}: the client-level noise multiplier {z:.3g} is below this "
                      f"node's floor, {policy.min_noise_multiplier:g}")
    if policy.require_secagg and not secure:
        broken.append(f"{REQUIRE_SECAGG}: this node sends updates only through secure "
                      "aggregation, the server asked for a plain update")
    return broken


def dp_violations(policy: NodePolicy, *, noise_multiplier: float, delta: float,
                  max_delta: float, server_delta: float) -> list[str]:
    """Rules this round's DP-SGD plan breaks (`max_delta`: the node's own for its data set).

    The refusal names only the rule and what the server set, never a value derived from the
    node's data (its delta and the computed noise both follow its row count)."""
    broken = []
    if delta > max_delta:
        broken.append(f"{MAX_DELTA}: the server's delta {server_delta:g} is above this node's "
                      "largest")
    if noise_multiplier < policy.min_noise_multiplier:
        broken.append(f"{MIN_NOISE}: this round's noise multiplier is below this node's floor, "
                      f"{policy.min_noise_multiplier:g}")
    return broken


def cohort_violations(policy: NodePolicy, cohort: int, threshold: int) -> list[str]:
    """Rules a secure-aggregation round of `cohort` clients and `threshold` breaks."""
    broken = []
    if cohort < policy.min_cohort:
        broken.append(f"{MIN_COHORT}: {cohort} clients in the round, this node needs at least "
                      f"{policy.min_cohort}")
    if threshold < policy.min_threshold:
        broken.append(f"{MIN_THRESHOLD}: threshold {threshold}, this node needs at least "
                      f"{policy.min_threshold}")
    return broken


def refusal(msg: Message, rules: list[str]) -> Message:
    """The reply to a request the policy forbids: the rules, logged here too, and no data."""
    reason = "; ".join(rules)
    log(WARNING, "Refused by this node's privacy policy: %s", reason)
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.STATUS: keys.POLICY_REFUSED,
                                                          keys.REASON: reason})}),
                   reply_to=msg)


def budget_refusal(msg: Message, spent: float | None) -> Message:
    """The 'budget exhausted' answer, and no update; what was spent where it may be said
    (`disclosed_epsilon`)."""
    log(WARNING, "Privacy budget exhausted: refusing round")
    content = RecordDict({keys.CONFIG: ConfigRecord({keys.STATUS: keys.BUDGET_EXHAUSTED})})
    if spent is not None:
        content[keys.METRICS] = MetricRecord({keys.EPSILON: spent})
    return Message(content, reply_to=msg)


def train_metrics(*, examples: int, loss: float, dp: bool, secure: bool,
                  epsilon: float | None) -> MetricRecord:
    """The metrics a train reply carries in the clear.

    Plain FedAvg needs the example count (its weight); the ledger's epsilon goes with it so the
    server can show each node's spending. Under secure aggregation the count and the loss travel
    inside the masked vector, so the server learns only their sums (and `epsilon` is None unless
    the policy reports it: it follows the data set's size). Under DP no loss leaves at all: it is
    computed from the data without noise."""
    metrics = MetricRecord({keys.UNIT_WEIGHT: 1})
    if not secure:
        metrics[keys.NUM_EXAMPLES] = examples
        if not dp:
            metrics[keys.TRAIN_LOSS] = loss
    if epsilon is not None:
        metrics[keys.EPSILON] = epsilon
    return metrics


def disclosed_epsilon(policy: NodePolicy, epsilon: float | None, *,
                      secure: bool) -> float | None:
    """The ledger's epsilon as a reply may carry it: always beside a plain update (which sends
    the example count anyway), under secure aggregation only where the policy reports it."""
    return epsilon if not secure or policy.report_epsilon else None


def evaluation_metrics(examples: int, loss: float, accuracy: float) -> MetricRecord:
    """Held-out loss and accuracy of the global adapter; sent only where the policy shares them."""
    return MetricRecord({keys.NUM_EXAMPLES: examples, keys.EVAL_LOSS: loss,
                         keys.ACCURACY: accuracy})


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise PolicyError(f"node policy `{name}` {rule}, got {value!r}")


def _typed(name: str, value: Any, kind: Any) -> Any:
    """Accept the value if it has the field's type (an int where a float is asked too)."""
    wanted = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,),
              "float | None": (int, float)}[str(kind)]
    if isinstance(value, bool) and bool not in wanted:
        raise PolicyError(f"node policy `{name}` must be a number, got {value!r}")
    if not isinstance(value, wanted):
        raise PolicyError(f"node policy `{name}` must be of type {wanted[0].__name__}, "
                          f"got {value!r}")
    return float(value) if float in wanted else value
