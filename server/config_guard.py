"""A restarted `fedtune server` resumes its run with the run's saved configuration; a TOML that
now says something else (a DP or secure-aggregation setting, say) must not be dropped in silence.

Only `federation.rounds` may change on a restart (it extends the run). Any other difference stops
the server before Flower starts, naming the keys, unless the operator accepts the change: then the
TOML becomes the run's configuration and the replaced one is kept beside it.
"""

from __future__ import annotations

import dataclasses
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


def changed_keys(saved: RunConfig, new: RunConfig) -> list[str]:
    """Dotted keys whose values, as the run uses them (an unset one resolved), differ, sorted;
    except those a restart may change, those the new TOML leaves unset (the run keeps what it
    has used: `carried`), and the audit's settings while neither side audits (inert there). A
    release that changes a default must not stop a deployment's restart."""
    before, after = _effective(saved), _effective(new)
    inert = set() if saved.audit.enabled or new.audit.enabled else {
        k for k in before.keys() | after.keys() if k.startswith("audit.")}
    skip = MAY_CHANGE | inert | _unset(new)
    return sorted(k for k in before.keys() | after.keys()
                  if k not in skip and before.get(k) != after.get(k))


def carried(saved: RunConfig, new: RunConfig) -> dict[str, Any]:
    """The values the run has used for the keys the new configuration leaves unset (None: the
    default of the run's kind), e.g. `lora.freeze_a: false` of a run started before FFA-LoRA
    became the DP-SGD default: an adapter's shape never changes under a running run."""
    before = _effective(saved)
    return {key: before[key] for key in _unset(new)}


def _unset(config: RunConfig) -> set[str]:
    """Dotted keys of every setting left unset (None), in any section."""
    return {f"{name}.{key}" for name, section in config.to_dict().items()
            if isinstance(section, dict) for key, value in section.items() if value is None}


def _effective(config: RunConfig) -> dict[str, Any]:
    """Dotted values as the run uses them: every setting left to the run's kind (training's
    zeros, an empty strategy, FFA-LoRA's None) filled with that kind's default, so a value
    written out equal to its default is no change, and a switch to DP-SGD names what it moves."""
    return dataclasses.replace(config, lora=config.adapter, train=config.training,
                               federation=config.aggregation).to_flat()


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
        shown = ", ".join(f"{k} ({_flat(saved, k)!r} -> {_flat(new, k)!r})" for k in changed)
        raise ConfigChangeError(
            f"{saved_file} was started with another configuration: {shown}; restore the TOML "
            "or pass --accept-config-change to continue the run with the new values")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # the old configuration is copied aside first, then replaced atomically: a crash in between
    # leaves one of the two in config.json, never none
    write_atomic(run_dir / f"config.replaced-{stamp}.json", saved_file.read_bytes())
    merged = new.with_overrides({"output.dir": saved.output.dir, **carried(saved, new)})
    write_atomic(saved_file, merged.to_json().encode())
    return changed



def _flat(config: RunConfig, key: str) -> Any:
    return _effective(config).get(key)
