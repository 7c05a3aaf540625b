"""`fedtune`: parse the command line and hand it to simulation, baseline or deployment.

No logic lives here: flags become dotted configuration keys, validated once by RunConfig.
Exit codes: 0 success, 2 bad input (one line naming the problem), 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtune.common.errors import InputError

# Flag -> dotted run-configuration key; type, help and default come from the field
# (common/config.py). Scripts depend on these flag names.
FLAGS: dict[str, str] = {
    "--data": "data.path",
    "--model": "model.name",
    "--task": "model.task",
    "--num-clients": "federation.num_clients",
    "--rounds": "federation.rounds",
    "--fraction-train": "federation.fraction_train",
    "--strategy": "federation.strategy",
    "--server-lr": "federation.server_lr",
    "--partition": "partition.scheme",
    "--alpha": "partition.alpha",
    "--partition-by": "partition.by",
    "--max-length": "model.max_length",
    "--pooling": "model.pooling",
    "--batch-size": "train.batch_size",
    "--local-epochs": "train.local_epochs",
    "--local-steps": "train.local_steps",
    "--lr": "train.lr",
    "--head-lr": "train.head_lr",
    "--lora-r": "lora.r",
    "--max-grad-norm": "train.max_grad_norm",
    "--dp": "privacy.dp",
    "--dp-level": "privacy.level",
    "--epsilon": "privacy.epsilon",
    "--delta": "privacy.delta",
    "--noise-multiplier": "privacy.noise_multiplier",
    "--clip-norm": "privacy.clip_norm",
    "--accountant": "privacy.accountant",
    "--secagg": "secagg.enabled",
    "--secagg-threshold": "secagg.threshold",
    "--secagg-neighbours": "secagg.neighbours",
    "--seed": "seed",
    "--out": "output.dir",
    "--tensorboard": "output.tensorboard",
    "--audit": "audit.enabled",
    "--canaries": "audit.canaries",
    "--canary-clients": "audit.clients",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    simulate = commands.add_parser("simulate", help="simulate a federation in one process")
    _add_run_flags(simulate)
    simulate.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last "
                          "checkpoint (its saved configuration is used; --rounds may extend it)")
    simulate.add_argument("--workers", type=int, help="Ray workers (default: one per core)")
    simulate.add_argument("--ray-address", metavar="HOST:PORT",
                          help="run the clients on an existing Ray cluster (its head's address, "
                          "or auto; default: $RAY_ADDRESS, else this machine's own Ray); every "
                          "node needs this fedtune install, the data and the model")
    centralized = commands.add_parser("centralized", help="the centralised LoRA baseline with "
                                      "the same data, model and passes")
    _add_run_flags(centralized)
    report = commands.add_parser("report", help="plots and a Markdown summary of a run")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    _add_result_commands(commands)
    _add_deployment_commands(commands)
    for command in commands.choices.values():
        command.add_argument("--verbose", action="store_true", help="also show libraries' "
                             "warnings and Flower's DEBUG and INFO lines")
    return parser


def _add_result_commands(commands: Any) -> None:
    """Using a run's model elsewhere: export it for transformers, or predict with it."""
    export = commands.add_parser("export", help="a run's model as a Hugging Face model "
                                 "directory (LoRA merged, tokenizer, label names)")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="a new directory")
    predict = commands.add_parser("predict", help="a run's or an exported model's answer for "
                                  "every row of a JSONL or CSV file, one JSON line each")
    predict.add_argument("source", type=Path, metavar="RUN_DIR|MODEL_DIR")
    predict.add_argument("--input", type=Path, required=True, metavar="FILE",
                         help="rows to predict: .jsonl, .jsonl.gz or .csv")
    predict.add_argument("--output", type=Path, metavar="FILE",
                         help="write the JSON lines here (default: standard output)")
    predict.add_argument("--text-field", help="field holding the text (default: the one the "
                         "model trained on)")
    predict.add_argument("--batch-size", type=int, default=32, help="rows per batch")
    predict.add_argument("--max-new-tokens", type=int, default=64,
                         help="causal LM: the longest continuation generated")


def run_result_command(args: argparse.Namespace) -> int:
    """export and predict: thin calls into simulations/export.py and simulations/predict.py."""
    if args.command == "export":
        from fedtune.simulations.export import export_run

        print(f"exported to {export_run(args.run_dir, args.out_dir)}")
        return 0
    import json

    from fedtune.simulations.predict import predict_file

    answers = predict_file(args.source, args.input, text_field=args.text_field,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    lines = (json.dumps(answer, ensure_ascii=False) + "\n" for answer in answers)
    if args.output is None:
        for line in lines:
            sys.stdout.write(line)
        return 0
    from fedtune.common.atomic_file import write_atomic

    write_atomic(args.output, "".join(lines).encode())
    print(f"predictions written to {args.output}", file=sys.stderr)
    return 0


def _add_deployment_commands(commands: Any) -> None:
    certs = commands.add_parser("certs", help="make the CA, server certificate and node keys")
    kinds = certs.add_subparsers(dest="certs_command", required=True)
    init = kinds.add_parser("init", help="a CA and a server TLS certificate")
    init.add_argument("dir", type=Path)
    init.add_argument("--server-host", action="append", required=True, metavar="NAME_OR_IP",
                      help="a name or address nodes dial (repeat for several)")
    init.add_argument("--force", action="store_true", help="replace existing files")
    node = kinds.add_parser("node", help="a node's authentication key pair")
    node.add_argument("dir", type=Path)
    node.add_argument("name")
    node.add_argument("--force", action="store_true", help="replace existing files")
    consortium = kinds.add_parser("consortium", help="bundle the nodes' public keys for every "
                                  "node to pin (`fedtune client --peers DIR`)")
    consortium.add_argument("dir", type=Path, help="the bundle directory to write")
    consortium.add_argument("keys", type=Path, nargs="+", metavar="NAME.pub",
                            help="every node's public key, named as `fedtune server --node` "
                            "names it")
    consortium.add_argument("--force", action="store_true", help="replace an existing bundle")

    server = commands.add_parser("server", help="run the federation's SuperLink and ServerApp")
    server.add_argument("--certs", type=Path, required=True, help="directory from `certs init`")
    server.add_argument("--state", type=Path, required=True,
                        help="directory for the SuperLink database, checkpoints and metrics")
    server.add_argument("--config", type=Path, required=True, help="TOML run configuration")
    server.add_argument("--node", type=Path, action="append", default=[], dest="nodes",
                        metavar="KEY.pub", help="register this node public key (repeat)")
    server.add_argument("--host", default="0.0.0.0", help="address to listen on")
    server.add_argument("--port", type=int, default=9200, help="port nodes connect to")
    _add_lockdown_flags(server, client=False)

    client = commands.add_parser("client", help="join a federation as a SuperNode")
    client.add_argument("--server", required=True, metavar="HOST:PORT")
    client.add_argument("--root-cert", type=Path, required=True, help="the federation's CA")
    client.add_argument("--node-key", type=Path, required=True, help="from `certs node`")
    client.add_argument("--data", type=Path, required=True, help="this node's data directory")
    client.add_argument("--ledger", type=Path, required=True, help="privacy ledger directory")
    _add_policy_flags(client)
    client.add_argument("--name", help="this node's name (default: the key's file name)")
    client.add_argument("--port", type=int, default=9094, help="this node's local API port")
    client.add_argument("--wait-server", type=float, default=120.0, metavar="SECONDS",
                        help="how long to wait for the server at start-up")
    _add_lockdown_flags(client, client=True)


def _add_lockdown_flags(parser: argparse.ArgumentParser, *, client: bool) -> None:
    """Who may reach the server and what a node runs (README, "Deployment")."""
    if client:
        parser.add_argument("--app-digest", action="append", default=[], metavar="SHA256",
                            help="run only the Flower app with this FAB digest (repeat; "
                            "default: the app of the fedtune installed here)")
        return
    parser.add_argument("--local-port", type=int, default=0,
                        help="the SuperLink's own port on 127.0.0.1 (Control and Runtime "
                        "APIs; default: a free port from 20000-29999)")
    parser.add_argument("--accept-config-change", action="store_true",
                        help="continue a run whose TOML configuration changed since it began")


def _add_policy_flags(client: argparse.ArgumentParser) -> None:
    """The node's privacy policy (client/policy.py), one flag per policy setting, with the help
    and default the setting itself declares."""
    from fedtune.client.policy import policy_flags

    rules = client.add_argument_group("node privacy policy (defaults are strict; a --policy "
                                      "TOML file with the same kebab-case keys, flags override)")
    rules.add_argument("--policy", type=Path, metavar="FILE", help="node policy TOML file")
    for flag in policy_flags():
        if flag.const is not None:
            rules.add_argument(flag.name, dest=flag.dest, action="store_const", const=flag.const,
                               help=flag.help)
        else:
            rules.add_argument(flag.name, dest=flag.dest, type=flag.kind, help=flag.help,
                               metavar={int: "N", float: "X"}.get(flag.kind, "TEXT"))


def run_deployment(args: argparse.Namespace) -> int:
    """certs, server and client: thin calls into common/certs.py, server/ and client/."""
    if args.command == "certs":
        from fedtune.common import certs

        if args.certs_command == "init":
            made = certs.init(args.dir, args.server_host, force=args.force)
            print(f"CA {made.ca_cert}, server certificate {made.server_cert}")
        elif args.certs_command == "consortium":
            from fedtune.common.consortium import bundle

            made = bundle(args.dir, args.keys, force=args.force)
            print(f"{len(made.names)} node keys in {made.directory} (give it to every node: "
                  f"--peers); bundle sha256:{made.digest}")
        else:
            private, public = certs.node_key(args.dir, args.name, force=args.force)
            print(f"node key {private} (keep it on the node), public key {public} (give it to "
                  "the operator)")
        return 0
    if args.command == "server":
        from fedtune.server.deploy import ServerSettings, serve

        return serve(ServerSettings(args.certs, args.state, args.config, args.nodes, args.host,
                                    args.port, local_port=args.local_port,
                                    accept_config_change=args.accept_config_change,
                                    verbose=args.verbose))
    from fedtune.client.deploy import ClientSettings, join, resolve_policy
    from fedtune.client.policy import policy_flags

    policy = resolve_policy(args.policy, {flag.key: getattr(args, flag.dest)
                                          for flag in policy_flags()})
    return join(ClientSettings(args.server, args.root_cert, args.node_key, args.data,
                               args.ledger, args.name or args.node_key.stem, policy,
                               args.port, args.wait_server,
                               app_digests=tuple(args.app_digest), verbose=args.verbose))


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    from fedtune.common.config import run_field
    from fedtune.common.settings import FLAG_TYPES, flag_help

    for flag, key in FLAGS.items():
        dest, field = flag[2:].replace("-", "_"), run_field(key)
        if field.type == "bool":
            parser.add_argument(flag, action="store_const", const=True, dest=dest,
                                help=flag_help(field))
        else:
            parser.add_argument(flag, type=FLAG_TYPES[field.type], dest=dest,
                                help=flag_help(field))


def resolve_config(args: argparse.Namespace) -> Any:
    """Defaults <- TOML file <- flags; or, with --resume, the run's saved configuration."""
    from fedtune.common.config import RunConfig, with_run_dir

    overrides = {key: getattr(args, flag[2:].replace("-", "_"))
                 for flag, key in FLAGS.items()}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if getattr(args, "resume", None):
        extra = sorted(set(overrides) - {"federation.rounds"})
        if extra or args.config:
            dropped = ", ".join(extra) or "--config"
            raise InputError(f"--resume uses the run's saved configuration; drop {dropped}")

        from fedtune.common.run_dir import CONFIG_FILE, saved_config

        saved = saved_config(args.resume)
        if saved is None:
            raise InputError(f"{args.resume} holds no fedtune run to resume (no {CONFIG_FILE})")
        return saved.with_overrides(overrides)
    config = RunConfig.from_toml(args.config) if args.config else RunConfig()
    return with_run_dir(config.with_overrides(overrides), args.command)


def run(args: argparse.Namespace) -> None:
    from fedtune.common.task import cached_task

    config = resolve_config(args)
    if args.command == "centralized" and config.privacy.dp:
        raise InputError("fedtune centralized is the non-private baseline; drop --dp")
    address = ""
    if args.command == "simulate":
        from fedtune.simulations.ray_cluster import check_address, cluster_address

        address = cluster_address(args.ray_address)
        if address:
            check_address(address)
    task = cached_task(config)  # loads data and model: bad input fails here, before Ray starts
    clients = config.federation.num_clients
    shares = [task.client_examples(config.partition, client, clients)[0]
              for client in range(clients)]
    _check_privacy(config, [len(rows) for rows in shares])
    if args.command == "centralized":
        from fedtune.simulations.centralized import train_centralized

        rows = train_centralized(config)
    else:
        from fedtune.simulations.engine import simulate

        rows = simulate(config, resume=bool(args.resume), num_workers=args.workers,
                        verbose=args.verbose, ray_address=address)
    if rows:
        from fedtune.server.run_summary import failed_replies, shortfall, summary_line

        print(summary_line(config.output.dir, rows))
        if (problem := shortfall(rows, config.federation.rounds)) is not None:
            print(f"fedtune: warning: {problem}", file=sys.stderr)
        if (failed := failed_replies(rows)) is not None:  # a simulated client fails only when
            # its own process does: an error in fedtune, or Ray ending its actor
            print(f"fedtune: warning: {failed}; a simulated client fails only when its process "
                  "does (--verbose shows why; Ray ends its actors when memory runs short)",
                  file=sys.stderr)
    if config.audit.enabled:
        from fedtune.simulations.audit import audit_run
        from fedtune.simulations.report import audit_line

        body = audit_run(config, centralized=args.command == "centralized")
        print(audit_line(body), file=sys.stderr if body["defect"] else sys.stdout)


def _check_privacy(config: Any, client_rows: list[int]) -> None:
    """Fail before any round when no noise level can meet the privacy target."""
    if not config.privacy.dp:
        return
    if config.privacy.level == "client":
        from fedtune.common.client_dp import client_level_plan

        client_level_plan(config)
        return
    from fedtune.client.dp_plan import plan_round

    for rows in client_rows:
        plan_round(config, rows)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from fedtune.common.console import configure

    configure(verbose=args.verbose)
    try:
        if args.command in ("certs", "server", "client"):
            return run_deployment(args)
        if args.command in ("export", "predict"):
            return run_result_command(args)
        if args.command == "report":
            from fedtune.simulations.report import write_report

            for path in write_report(args.run_dir):
                print(path)
            return 0
        run(args)
    except InputError as error:  # one line naming the problem, exit 2
        print(f"fedtune: error: {error}", file=sys.stderr)
        return 2
    return 0
