"""What `fedtune simulate` relies on in Flower's simulation engine (see simulations/engine.py)."""

from __future__ import annotations

import inspect

from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.simulation import run_simulation
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager

from fedtune.simulations.node_names import recorded_node_names


def test_run_simulation_is_still_there_with_the_arguments_fedtune_passes():
    # Fails when Flower removes the deprecated function or changes what engine.py passes it:
    # then move `fedtune simulate` to `flwr run` (docs/simulation.md, "Why run_simulation").
    parameters = inspect.signature(run_simulation).parameters
    for name in ("server_app", "client_app", "num_supernodes", "backend_config",
                 "verbose_logging"):
        assert name in parameters, f"run_simulation lost its {name!r} argument"


def test_node_names_are_recorded_from_the_engines_own_registration():
    state = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                             ObjectStoreFactory())
    original = vce_api._register_nodes
    with recorded_node_names() as names:
        assert vce_api._register_nodes is not original
        partition_of = vce_api._register_nodes(num_nodes=5, state_factory=state)
    assert vce_api._register_nodes is original  # restored after the simulation
    assert len(names) == 5
    assert sorted(names(node_id) for node_id in partition_of) == [f"client-{i}"
                                                                  for i in range(5)]
    assert names(-1) is None  # a node not registered by the engine is asked its name


def test_start_vce_registers_nodes_through_the_recorded_function():
    # The record works only while start_vce calls `_register_nodes` by its module name.
    assert "_register_nodes(" in inspect.getsource(vce_api.start_vce)


def test_a_node_seen_before_the_record_waits_for_it_instead_of_being_asked():
    import threading

    from fedtune.simulations.node_names import NodeNames

    names = NodeNames(wait=30)
    answer = []
    asking = threading.Thread(target=lambda: answer.append(names(77)))
    asking.start()
    names.record({77: 3})
    asking.join(10)
    assert answer == ["client-3"]
