"""The ServerApp: the same federation under `flwr run`, `fedtune simulate` and `fedtune server`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.common import console
from fedtune.common.config import ConfigError, RunConfig, with_run_dir
from fedtune.server.config_guard import continued
from fedtune.server.federation import run_federation
from fedtune.server.node_registry import read_node_names
from fedtune.server.progress import RoundProgress

console.quiet_worker()  # in a deployed ServerApp's process: Flower's records once, less noise

CONFIG_FILE_KEY = "config-file"  # run-config key: a TOML file on the server's disk
NODE_NAMES_KEY = "node-names-file"  # run-config key: {node id: name} of the registered keys


def make_server_app(config: RunConfig | None = None, *, resume: bool = False,
                    node_names: Callable[[int], str | None] | None = None,
                    display: RoundProgress | None = None) -> ServerApp:
    """A ServerApp running `config`, or, when None, the run config Flower hands it.

    `node_names`: names simulated nodes without a message (`simulations/node_names.py`);
    `display`: the live round display of the simulating process (else a line per round)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is not None:  # in-process simulation (`fedtune simulate`)
            run_federation(grid, config, resume=resume, simulated=True,
                           node_names=node_names, display=display)
            return
        values = dict(context.run_config)
        names_file = str(values.pop(NODE_NAMES_KEY, "") or "")
        run_config, resuming = config_from_run_config(values)
        if not names_file:  # a bare `flwr run`: nodes are asked their names
            run_federation(grid, run_config, resume=resuming)
            return
        names = read_node_names(names_file)  # `fedtune server`: named by their keys alone
        run_federation(grid, run_config, resume=resuming, node_names=names.get, ask_names=False)

    return server_app


def config_from_run_config(values: Mapping[str, Any]) -> tuple[RunConfig, bool]:
    """(configuration, resume?) from Flower's run config.

    With `config-file` set (as `fedtune server` does), the TOML file is the configuration and only
    `output.dir` comes from the run config. A run directory that already holds a run is resumed
    with its saved configuration (`federation.rounds` may extend it): a restarted server goes on
    from its last checkpoint.
    """
    values = dict(values)
    config_file = str(values.pop(CONFIG_FILE_KEY, "") or "")
    if config_file:
        config = RunConfig.from_toml(config_file).with_overrides(
            {"output.dir": values.get("output.dir", "")})
    else:
        config = RunConfig.from_mapping(values)
    refuse_audit(config)
    config = with_run_dir(config, "flwr")
    previous = continued(Path(config.output.dir), config)
    return (config, False) if previous is None else (previous, True)


def refuse_audit(config: RunConfig) -> None:
    """The privacy audit is a researcher's tool in one process: a deployed node holds no canaries
    and no one scores them, so an audited deployment would claim an audit that never ran."""
    if config.audit.enabled:
        raise ConfigError("`audit.enabled` is for `fedtune simulate --audit` and `fedtune "
                          "centralized --audit` only, not a deployment or `flwr run`")


app = make_server_app()
