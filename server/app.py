"""The ServerApp: the same federation under `flwr run`, `fedtune simulate` and `fedtune server`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig, with_run_dir
from server.federation import run_federation


def make_server_app(config: RunConfig | None = None, *, resume: bool = False) -> ServerApp:
    """A ServerApp running `config`, or, when None, the run config Flower hands it."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = config or with_run_dir(RunConfig.from_mapping(dict(context.run_config)),
                                            "flwr")
        run_federation(grid, run_config, resume=resume)

    return server_app


app = make_server_app()
