"""A restarted `fedtune server` resumes its run with the run's saved configuration; a TOML that
now says something else (a DP or secure-aggregation setting, say) must not be dropped in silence.

Only `federation.rounds` may change on a restart (it extends the run). Any other difference stops
the server before Flower starts, naming the keys, unless the operator accepts the change: then the
TOML becomes the run's configuration and the replaced one is kept beside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedtune.common.atomic_file import write_atomic
from fedtune.common.config import RunConfig
from fedtune.common.errors import InputError
from fedtune.common.run_dir import CONFIG_FILE, saved_config

MAY_CHANGE = {"federation.rounds", "output.dir"}  # output.dir is set by fedtune server itself


class ConfigChangeError(InputError, ValueError):
    """The configuration differs from the one the run was started with."""


def continued(run_dir: Path, new: RunConfig) -> RunConfig | None:
    """The configuration a resumed run goes on with: the one it saved, with `new`'s
    `federation.rounds` (a restart may extend it); None where `run_dir` holds no run. Whatever
    the server sizes or checks for a resumed run reads this, not the TOML."""
    saved = saved_config(run_dir)
    if saved is None:
        return None
    return saved.with_overrides({"federation.rounds": new.federation.rounds})


def changed_keys(saved: RunConfig, new: RunConfig) -> list[str]:
    """Dotted keys whose values, as the run would go on with them (`restarted`, every default
    resolved), differ from the run's, sorted; except those a restart may change, and the audit's
    settings while neither side audits (inert there)."""
    before, after = _compared(saved, new)
    inert = set() if saved.audit.enabled or new.audit.enabled else {
        k for k in before.keys() | after.keys() if k.startswith("audit.")}
    skip = MAY_CHANGE | inert
    return sorted(k for k in before.keys() | after.keys()
                  if k not in skip and before.get(k) != after.get(k))


def restarted(saved: RunConfig, new: RunConfig) -> RunConfig:
    """`new` as the run goes on with it: what it leaves to the default keeps the value the run
    used (`carried`), so a release that changes a default changes no running run."""
    return new.with_overrides(carried(saved, new))


def carried(saved: RunConfig, new: RunConfig) -> dict[str, Any]:
    """The run's values for the keys the new configuration leaves to the default of the run's
    kind. A switch between plain training and DP-SGD takes the new kind's training defaults;
    the adapter's shape (`lora`, e.g. FFA-LoRA's `freeze_a`) and where its head started
    (`model.head_init`) never change under a running run."""
    before = _effective(saved)
    same_kind = saved.privacy.sample_level == new.privacy.sample_level
    return {key: before[key] for key in _left_to_default(new)
            if same_kind or key.startswith("lora.") or key == "model.head_init"}


def kept_from_the_run(saved: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """{key: (the run's value, the TOML's default)} where the two differ: what a restart keeps
    that the TOML alone would set otherwise (a line removed, or a default a release changed),
    for the operator to read; written out in the TOML it is a change like any other."""
    defaults = _effective(new)
    return {key: (value, defaults.get(key)) for key, value in carried(saved, new).items()
            if value != defaults.get(key)}


def _left_to_default(config: RunConfig) -> set[str]:
    """Dotted keys whose value stands for the default of the run's kind (a zero, an empty
    strategy, a None): those `RunConfig.resolved` fills in."""
    given, resolved = config.to_flat(), config.resolved().to_flat()
    return {key for key, value in resolved.items() if given.get(key) != value}


def _effective(config: RunConfig) -> dict[str, Any]:
    return config.resolved().to_flat()


def _compared(saved: RunConfig, new: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run's values, the values it would go on with): what a restart is judged on."""
    return _effective(saved), _effective(restarted(saved, new))


def check_restart(run_dir: Path, new: RunConfig, *, accept: bool) -> list[str]:
    """Refuse a changed configuration for an existing run, or (accepted) make it the run's.

    Returns the changed keys (empty for a new run or an unchanged one).
    """
    saved_file = run_dir / CONFIG_FILE
    if not saved_file.is_file():
        return []
    saved = saved_config(run_dir)
    changed = changed_keys(saved, new)
    if not changed:
        return []
    if not accept:
        before, after = _compared(saved, new)
        shown = ", ".join(f"{k} ({before.get(k)!r} -> {after.get(k)!r})" for k in changed)
        raise ConfigChangeError(
            f"{saved_file} was started with another configuration: {shown}; restore the TOML "
            "or pass --accept-config-change to continue the run with the new values")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # the old configuration is copied aside first, then replaced atomically: a crash in between
    # leaves one of the two in config.json, never none
    write_atomic(run_dir / f"config.replaced-{stamp}.json", saved_file.read_bytes())
    merged = restarted(saved, new).with_overrides({"output.dir": saved.output.dir})
    write_atomic(saved_file, merged.resolved().to_json().encode())
    return changed
