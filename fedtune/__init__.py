"""fedtune: federated LoRA fine-tuning under differential privacy and secure aggregation, on
Flower. One import name: `fedtune.common` (what both sides share), `fedtune.client` (a data
owner's node), `fedtune.server` (the aggregator), `fedtune.simulations` (many clients in one
process) and `fedtune.cli` (the `fedtune` command).

Installed from a wheel those packages sit inside this one. In the source tree, and in the app
bundle (FAB) a node runs, they are the layout's directories beside this one: the package then
looks there too.
"""

from pathlib import Path

_here = Path(__file__).resolve().parent
_beside = _here.parent
if not (_here / "common").is_dir() and (_beside / "pyproject.toml").is_file() and \
        (_beside / "common" / "__init__.py").is_file():  # never in an installed wheel
    __path__.append(str(_beside))
