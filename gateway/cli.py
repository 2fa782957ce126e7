"""Command line: ``gateway serve``, ``gateway sidecar``, the sidecar's clients (``labels``,
``export``, ``report``, ``verdict``, ``actions``, ``review``), the admin clients (``routes``,
``promote``, ``rollback``, ``costs``, ``cache``, ``rollout``) and ``gateway demo-repo``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from gateway.errors import ModelLoadError, SettingsError

if TYPE_CHECKING:
    from gateway.auth import ClientCredentials

__all__ = ["main"]

DEFAULT_SIDECAR = "127.0.0.1:8005"
DEFAULT_GATEWAY = "127.0.0.1:8001"
ADMIN_TOKEN_ENV = "GATEWAY_ADMIN_TOKEN"
SIDECAR_TOKEN_ENV = "GATEWAY_SIDECAR_TOKEN"
_GROUPS = ("tenant", "route", "variant", "surface")
_LABEL_COLUMNS = """\
columns (by name; others are ignored):
  label         the outcome, a number (1/0 for a classifier); a column named value is
                taken instead when there is no label column
  request_id    the request the prediction answered (its id, or the response parameter
                request_id when the client sent none)
  entity_key    or: the request parameter entity_key; the label joins that entity's
                latest prediction within --window-s before event_time
  row           which row of a request of several rows (default 0)
  event_time    when the outcome was known: a timestamp, or Unix microseconds (default:
                when the sidecar receives it)
the file needs a request_id or an entity_key column (or both)
"""
# A command killed by SIGPIPE exits 128 + 13: what `set -o pipefail` expects of a writer
# whose reader left early (`gateway routes | head`).
_BROKEN_PIPE_EXIT = 141


def _parser() -> argparse.ArgumentParser:
    # NOTE: the module docstring is reStructuredText; --help shows it without the markup.
    parser = argparse.ArgumentParser(prog="gateway", description=(__doc__ or "").replace("``", ""))
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model repository over OIP gRPC")
    serve.add_argument("--config", type=Path, help="settings YAML file")
    serve.add_argument("--repository", type=Path, help="model repository directory")
    serve.add_argument("--host", help="gRPC bind address (server.host)")
    serve.add_argument("--port", type=int, help="gRPC port, 0 = any free one (server.port)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (telemetry.metrics_port)")
    serve.add_argument(
        "--http-port", type=int, help="KServe v2 REST port, 0 = any free one (server.http_port)"
    )
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help="runtime.device")
    serve.add_argument("--tracing", choices=["off", "console", "otlp"], help="telemetry.tracing")
    serve.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="the OTLP/gRPC collector of --tracing otlp (telemetry.otlp_endpoint)",
    )
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--workers", type=int, help="processes sharing the port (server.workers)")
    serve.add_argument(
        "--transport",
        choices=["auto", "native", "grpcio"],
        help="gRPC transport (server.transport)",
    )
    serve.add_argument("--sidecar", help="stream prediction events to HOST:PORT (events.sidecar)")
    serve.add_argument("--events-dir", type=Path, help="event write-ahead log (events.directory)")
    serve.add_argument(
        "--with-sidecar",
        type=Path,
        metavar="STORE",
        help="also run the evaluation sidecar, storing in STORE, at --sidecar (default "
        f"{DEFAULT_SIDECAR}; HTML reports on the next port), and stream events to it",
    )

    sidecar = commands.add_parser(
        "sidecar", help="run the evaluation sidecar: store prediction events, labels, reports"
    )
    sidecar.add_argument("--store", type=Path, required=True, help="directory of its DuckDB file")
    sidecar.add_argument("--host", default="127.0.0.1", help="gRPC bind address")
    sidecar.add_argument("--port", type=int, default=8005, help="gRPC port, 0 = any free one")
    sidecar.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sidecar.add_argument("--repository", type=Path, help="model repository (drift references)")
    sidecar.add_argument("--config", type=Path, help="settings YAML (its evaluation section)")
    sidecar.add_argument("--http-port", type=int, help="HTML reports (evaluation.http_port)")

    client = _client_options(
        "sidecar",
        "--sidecar",
        DEFAULT_SIDECAR,
        SIDECAR_TOKEN_ENV,
        "a sidecar key with the command's role: read for report, verdict and export, write "
        "for labels",
    )
    report = commands.add_parser(
        "report", parents=[client], help="print a model's evaluation report"
    )
    report.add_argument("model")
    report.add_argument("--window-s", type=int, default=0, help="window (default: the sidecar's)")
    report.add_argument("--json", action="store_true", help="print the JSON itself")

    verdict = commands.add_parser(
        "verdict", parents=[client], help="promote, hold or rollback a canary"
    )
    verdict.add_argument("model")
    verdict.add_argument("--candidate", default="", help="when the model has several canaries")
    verdict.add_argument("--json", action="store_true", help="print the evidence as JSON")

    actions = commands.add_parser(
        "actions",
        parents=[client],
        help="print the retraining trigger runs and playbook actions the sidecar recorded",
    )
    actions.add_argument("model", nargs="?", default="", help="one model (default: all)")
    actions.add_argument("--limit", type=int, default=50, help="the latest N (default 50)")
    actions.add_argument("--json", action="store_true", help="print them as JSON")
    triggers = commands.add_parser("triggers", help="the sidecar's retraining triggers")
    triggering = triggers.add_subparsers(dest="triggers_command", required=True)
    run = triggering.add_parser(
        "run", parents=[client], help="run a model's trigger now, by hand (kind manual)"
    )
    run.add_argument("model")
    run.add_argument("--name", default="", help="which trigger (default: the model's only one)")
    run.add_argument("--reason", default="", help="why, recorded with the run")
    run.add_argument("--force", action="store_true", help="run it within its cooldown too")
    run.add_argument(
        "--wait", action="store_true", help="wait for it to end; exit 3 unless it ended ok"
    )
    run.add_argument("--timeout", type=float, default=3600.0, help="of --wait, in seconds")
    review = commands.add_parser(
        "review", help="the human review queue (the human_review playbook)"
    )
    reviewing = review.add_subparsers(dest="review_command", required=True)
    listing = reviewing.add_parser("list", parents=[client], help="print the queue")
    listing.add_argument("--model", default="", help="one model (default: all)")
    listing.add_argument("--status", choices=["open", "resolved", "all"], default="open")
    listing.add_argument("--json", action="store_true", help="print it as JSON")
    resolve = reviewing.add_parser("resolve", parents=[client], help="close an open review")
    resolve.add_argument("id", type=int)
    resolve.add_argument("--note", default="", help="what was found or done")

    labels = commands.add_parser(
        "labels",
        parents=[client],
        help="send labels (CSV or Parquet) to the sidecar",
        description="Send outcomes to the sidecar, which joins each to the prediction it labels.",
        epilog=_LABEL_COLUMNS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    labels.add_argument("file", type=Path, help="CSV (with a header row) or .parquet")
    labels.add_argument(
        "--window-s", type=int, default=0, help="entity-key join window (default: the sidecar's)"
    )

    export = commands.add_parser(
        "export",
        parents=[client],
        help="write a model's events, or its labelled training rows, to Parquet",
    )
    export.add_argument("model")
    export.add_argument(
        "--out", type=Path, required=True, help="Parquet file to write (streamed from the sidecar)"
    )
    export.add_argument("--version", default="", help="one model version (default: all)")
    export.add_argument("--labelled", action="store_true", help="training rows: features+label")
    export.add_argument("--since", help="window start, ISO 8601 (default: the first event)")
    export.add_argument("--until", help="window end, ISO 8601, exclusive (default: now)")
    export.add_argument(
        "--max-rows", type=int, default=0, help="the newest N rows of the window (default: all)"
    )

    validate = commands.add_parser(
        "validate",
        parents=[client],
        help="the validation gate: replay labelled rows through a new version offline and "
        "judge it against the serving one; writes gate.json beside it (exit 0 pass, 3 fail)",
    )
    validate.add_argument("model")
    validate.add_argument("version", type=int)
    validate.add_argument(
        "--data",
        type=Path,
        help="labelled Parquet (gateway export MODEL --labelled); default: export the window "
        "from the sidecar at --sidecar",
    )
    validate.add_argument(
        "--against",
        type=int,
        help="the serving version to compare with (default: the highest below VERSION)",
    )
    validate.add_argument("--config", type=Path, help="settings YAML (adaptation.gate, runtime)")
    validate.add_argument("--repository", type=Path, help="model repository (repository.path)")
    validate.add_argument("--since", help="sidecar window start, ISO 8601")
    validate.add_argument("--until", help="sidecar window end, ISO 8601, exclusive")
    validate.add_argument("--json", action="store_true", help="print the result as JSON")

    parity = commands.add_parser(
        "parity",
        help="training/serving parity on a labelled export: the contract's offline path, and "
        "an offline pipeline's features (--offline), against what serving saw (exit 0 same, 3 "
        "different)",
    )
    parity.add_argument("model")
    parity.add_argument(
        "--export", type=Path, required=True, help="gateway export MODEL --labelled's Parquet"
    )
    parity.add_argument(
        "--offline",
        type=Path,
        help="Parquet of the same rows (request_id, row) with features as an offline "
        "pipeline computed them",
    )
    parity.add_argument("--version", help="the model version's rows (default: the highest)")
    parity.add_argument("--repository", type=Path, default=Path("models"), help="its contracts")
    parity.add_argument("--json", action="store_true", help="print the result as JSON")

    admin = _client_options(
        "gateway",
        "--url",
        DEFAULT_GATEWAY,
        ADMIN_TOKEN_ENV,
        "the gateway's admin.token, or a key with admin rights",
    )
    routes = commands.add_parser("routes", parents=[admin], help="print or set the route table")
    routes.add_argument(
        "--set",
        type=Path,
        metavar="FILE",
        help="replace it with FILE's routes (YAML): a mapping of routes, as gateway routes "
        "prints it, or a settings file's routing.routes (the rest of that file is not sent)",
    )
    promote = commands.add_parser(
        "promote", parents=[admin], help="send all of a route's traffic to one variant"
    )
    promote.add_argument("route")
    promote.add_argument("variant")
    rollback = commands.add_parser(
        "rollback", parents=[admin], help="restore a route's previous spec"
    )
    rollback.add_argument("route")
    threshold = commands.add_parser(
        "threshold", parents=[admin], help="set or raise a route's decision threshold"
    )
    threshold.add_argument("route")
    threshold.add_argument("value", nargs="?", type=float, help="the new threshold")
    threshold.add_argument(
        "--raise-by", type=float, default=0.0, help="raise it by this much (to max_threshold)"
    )
    for changing in (routes, promote, rollback, threshold):
        changing.add_argument(
            "--if-generation",
            type=int,
            default=0,
            metavar="N",
            help="change only the table of generation N (as gateway routes printed it), "
            "else FAILED_PRECONDITION: someone changed it since",
        )
    costs = commands.add_parser("costs", parents=[admin], help="print the cost ledger, budgets")
    costs.add_argument(
        "--by",
        default="tenant,route,variant,surface",
        help="comma-separated grouping: tenant, route, variant, surface",
    )
    costs.add_argument("--since-s", type=float, default=0, help="only the last N seconds")
    cache = commands.add_parser("cache", parents=[admin], help="response cache stats")
    cache.add_argument("--flush", action="store_true", help="empty the cache")
    rollout = commands.add_parser(
        "rollout",
        parents=[admin],
        help="walk a candidate version through shadow and canary steps on its verdicts",
    )
    rollout.add_argument("action", choices=["start", "status", "pause", "resume", "abort"])
    rollout.add_argument("route")
    rollout.add_argument("--candidate", default="", help="start: the candidate's version")
    rollout.add_argument(
        "--steps",
        default="",
        help="start: e.g. shadow,5,25,50,100 (default: adaptation.rollout.steps)",
    )
    rollout.add_argument("--json", action="store_true", help="print the rollout's record")

    story = commands.add_parser(
        "story",
        help="run a failure story on the demo (a real gateway and sidecar) and print what a "
        "person would see",
    )
    story.add_argument("name", help="new-vertical, skew, drift-that-matters or invisible-cost")
    story.add_argument("--workdir", type=Path, help="keep its files here (default: a temp dir)")
    story.add_argument("--json", action="store_true", help="print the signals as JSON")

    demo = commands.add_parser("demo-repo", help="build the demo model repository into DIR")
    demo.add_argument("directory", type=Path)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--rows", type=int, default=20_000, help="synthetic training rows")
    return parser


def _client_options(
    peer: str, address_flag: str, address: str, token_env: str, key: str
) -> argparse.ArgumentParser:
    """The options of every command that calls ``peer`` (the gateway, the sidecar): where it
    is, the key to present (``key`` says which) and TLS. No option takes a secret itself:
    command lines show in ``ps`` and shell histories."""
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        address_flag,
        dest="address",
        default=address,
        metavar="HOST:PORT",
        help=f"the {peer}'s address (default: {address})",
    )
    client.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help=f"file (mode 0600) holding {key} (default: ${token_env})",
    )
    client.add_argument(
        "--ca-file", type=Path, metavar="FILE", help=f"TLS: the CA the {peer}'s certificate is from"
    )
    client.add_argument("--cert-file", type=Path, metavar="FILE", help="mTLS: this certificate")
    client.add_argument("--key-file", type=Path, metavar="FILE", help="mTLS: its private key")
    client.add_argument(
        "--server-name", help=f"TLS: the name to verify the {peer}'s certificate against"
    )
    # NOTE: without this, argparse would take `--token KEY` (the flag this once had) as an
    # abbreviation of --token-file, and name the key in its "cannot read" error.
    client.add_argument("--token", action=_KeyOnCommandLine, help=argparse.SUPPRESS)
    client.set_defaults(peer=peer, token_env=token_env)
    return client


class _KeyOnCommandLine(argparse.Action):
    """Refuses a key given as a flag, without repeating it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> NoReturn:
        parser.error(
            f"{option_string} is not an option: a key on the command line shows in ps and "
            f"shell history; give --token-file FILE (mode 0600) or ${namespace.token_env}"
        )


def _credentials(args: argparse.Namespace) -> ClientCredentials:
    """What the command presents, from the options of ``_client_options`` and the environment."""
    from gateway.auth import ClientCredentials, bearer_metadata
    from gateway.settings import ClientTlsSettings, read_secret

    if args.token_file is not None:
        token = read_secret(None, args.token_file, "--token-file")
        if token is None:
            raise SettingsError(f"--token-file: {args.token_file} is empty")
        bearer_metadata(token, "--token-file")
    else:
        token = os.environ.get(args.token_env, "").strip() or None
        bearer_metadata(token, f"${args.token_env}")
    if (args.cert_file is None) != (args.key_file is None):
        raise SettingsError("--cert-file and --key-file go together")
    for flag, value in (("--cert-file", args.cert_file), ("--server-name", args.server_name)):
        if value is not None and args.ca_file is None:
            raise SettingsError(f"{flag} needs --ca-file (it rides on TLS)")
    tls = ClientTlsSettings(
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        server_name=args.server_name,
    )
    return ClientCredentials(token, tls)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    flags = {
        ("repository", "path"): args.repository,
        ("server", "host"): args.host,
        ("server", "port"): args.port,
        ("server", "workers"): args.workers,
        ("server", "transport"): args.transport,
        ("server", "http_port"): args.http_port,
        ("events", "sidecar"): args.sidecar,
        ("events", "directory"): args.events_dir,
        ("telemetry", "metrics_port"): args.metrics_port,
        ("runtime", "device"): args.device,
        ("telemetry", "tracing"): args.tracing,
        ("telemetry", "otlp_endpoint"): args.otlp_endpoint,
        ("telemetry", "log_level"): args.log_level,
    }
    tree: dict[str, Any] = {}
    for (section, key), value in flags.items():
        if value is not None:
            tree.setdefault(section, {})[key] = value
    return tree


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    from gateway.settings import load_settings
    from gateway.telemetry import configure_logging

    settings = load_settings(args.config, overrides=_overrides(args))
    configure_logging(settings.telemetry.log_level)
    sidecar = None
    if args.with_sidecar is not None:
        from gateway.evaluation.child import start_sidecar

        address = settings.events.sidecar or DEFAULT_SIDECAR
        evaluation = settings.evaluation
        sidecar = start_sidecar(
            args.with_sidecar,
            address,
            settings.repository.path,
            config=args.config,  # its evaluation section: rules, canaries, ports, auth
            # HTML pages on the next port, unless the section says where (or refuses them:
            # they carry no credentials).
            http_port=evaluation.http_port is None and evaluation.auth.mode == "none",
        )
        events = settings.events.model_copy(update={"sidecar": address})
        settings = settings.model_copy(update={"events": events})
        argv = [*_without_flags(argv, "--with-sidecar"), "--sidecar", address]
    try:
        if settings.server.workers > 1:
            from gateway.workers import supervise

            # Workers get the same command line; the supervisor pins their ports and role.
            worker_argv = _without_flags(
                argv, "--workers", "--port", "--metrics-port", "--http-port"
            )
            return supervise(settings, worker_argv)

        from gateway.lifeline import watch_parent

        watch_parent("worker")  # a supervisor's worker stops once it is gone; else a no-op
        import uvloop

        from gateway.app import Gateway

        gateway = Gateway(settings)
        uvloop.run(gateway.serve_until_signal())
        return 0
    finally:
        if sidecar is not None:
            sidecar.stop()


def _without_flags(argv: list[str], *dropped: str) -> list[str]:
    """argv less each ``flag VALUE`` / ``flag=VALUE`` of ``dropped``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in dropped:
            skip = True
            continue
        if arg.startswith(tuple(f"{d}=" for d in dropped)):
            continue
        out.append(arg)
    return out


def _sidecar(args: argparse.Namespace) -> int:
    import uvloop

    from gateway.evaluation.sidecar import run_sidecar
    from gateway.lifeline import watch_parent
    from gateway.settings import load_settings
    from gateway.telemetry import configure_logging

    watch_parent("sidecar")  # started by `serve --with-sidecar`: stops once that is gone
    flags = {"evaluation": {"http_port": args.http_port}} if args.http_port is not None else {}
    settings = load_settings(args.config, overrides=flags)
    configure_logging(args.log_level or "INFO")
    uvloop.run(run_sidecar(args.store, args.host, args.port, settings.evaluation, args.repository))
    return 0


def _labels(args: argparse.Namespace) -> int:
    from gateway.evaluation.client import LabelFileError, read_labels, send_labels

    try:
        labels = read_labels(args.file)
    except LabelFileError as err:
        print(f"gateway: error: {err}", file=sys.stderr)
        return 2
    joined, unmatched = send_labels(args.address, labels, args.window_s, _credentials(args))
    print(f"{len(labels)} labels sent: {joined} joined a prediction, {unmatched} wait for theirs")
    return 0


def _export(args: argparse.Namespace) -> int:
    from gateway.api.v1 import events_pb2 as ev
    from gateway.evaluation.client import export

    out = args.out.resolve()
    rows = export(
        args.address,
        ev.ExportRequest(
            model=args.model,
            version=args.version,
            labelled=args.labelled,
            start_us=_micros(args.since, "--since"),
            end_us=_micros(args.until, "--until"),
            max_rows=args.max_rows,
        ),
        out,
        _credentials(args),
    )
    print(f"{rows} rows written to {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from gateway.evaluation.client import fetch_report, format_report

    report = fetch_report(args.address, args.model, args.window_s, _credentials(args))
    if _is_unknown(report):
        window = f"the last {report['window_s']} s" if report.get("window_s") else "its window"
        print(
            f"gateway: error: sidecar at {args.address}: nothing on model {args.model!r}: no "
            f"events in {window}, no reference profile, no trigger runs, playbook actions or "
            "reviews (is the name right? a longer --window-s?)",
            file=sys.stderr,
        )
        return 1
    if args.json:
        import json

        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    return 0


def _is_unknown(report: dict[str, Any]) -> bool:
    """The sidecar knows nothing of the report's model: a misspelt name, or one whose
    events are all older than the window (a model with a reference profile never is)."""
    return not (
        report.get("events_in_window")
        or report.get("reference")
        or report.get("alerts")
        or any((report.get("journal_totals") or {}).values())
    )


def _adaptation(args: argparse.Namespace) -> int:
    """``gateway actions`` and ``gateway review list|resolve``."""
    import json

    from gateway.evaluation import client

    credentials = _credentials(args)
    if args.command == "triggers":
        return _run_trigger(args, credentials)
    if args.command == "actions":
        actions = client.fetch_actions(args.address, args.model, args.limit, credentials)
        print(json.dumps(actions, indent=1) if args.json else client.format_actions(actions))
    elif args.review_command == "list":
        reviews = client.fetch_reviews(args.address, args.model, args.status, credentials)
        print(json.dumps(reviews, indent=1) if args.json else client.format_reviews(reviews))
    else:
        client.resolve_review(args.address, args.id, args.note, credentials)
        print(f"review {args.id} resolved")
    return 0


def _run_trigger(args: argparse.Namespace, credentials: Any) -> int:
    """``gateway triggers run MODEL``: start it; with --wait, poll the journal until it ends."""
    import time

    from gateway.evaluation import client

    started = client.run_trigger(
        args.address, args.model, args.name, args.reason, args.force, credentials
    )
    print(f"trigger {started['name']}: run {started['id']} started ({started['ran']})")
    if not args.wait:
        print(f"`gateway actions {args.model}` shows its outcome")
        return 0
    until = time.monotonic() + args.timeout
    while time.monotonic() < until:
        time.sleep(1.0)
        for entry in client.fetch_actions(args.address, args.model, 200, credentials):
            if entry["id"] == started["id"] and entry["outcome"] != "running":
                print(client.format_actions([entry]))
                return 0 if entry["outcome"] == "ok" else 3
    print(f"run {started['id']} still running after {args.timeout:g} s", file=sys.stderr)
    return 3


def _verdict(args: argparse.Namespace) -> int:
    from gateway.evaluation.client import fetch_verdict

    reply = fetch_verdict(args.address, args.model, args.candidate, _credentials(args))
    if args.json:
        print(reply.json)
    else:
        print(reply.verdict.upper())
        print("\n".join(f"  {reason}" for reason in reply.reasons))
    return 0


def _validate(args: argparse.Namespace) -> int:
    import tempfile

    from gateway.adaptation.gate import read_window, validate
    from gateway.adaptation.gate_result import format_result, write_result
    from gateway.settings import load_settings

    flags = {"repository": {"path": args.repository}} if args.repository is not None else {}
    settings = load_settings(args.config, overrides=flags)
    if settings.repository.path is None:
        raise SettingsError("repository.path: the model repository is needed (--repository)")
    repository = Path(settings.repository.path)
    with tempfile.TemporaryDirectory(prefix="gateway-validate-") as scratch:
        data = args.data
        if data is None:
            from gateway.api.v1 import events_pb2 as ev
            from gateway.evaluation.client import export

            data = Path(scratch) / "window.parquet"
            request = ev.ExportRequest(
                model=args.model,
                labelled=True,
                start_us=_micros(args.since, "--since"),
                end_us=_micros(args.until, "--until"),
                max_rows=settings.adaptation.gate.max_rows,
            )
            export(args.address, request, data, _credentials(args))
        window = read_window(data, str(data) if args.data else f"sidecar {args.address}")
        result = validate(
            repository,
            args.model,
            args.version,
            window,
            settings.adaptation.gate,
            settings.runtime,
            args.against,
        )
    path = write_result(repository / args.model / str(args.version), result)
    if args.json:
        import json

        print(json.dumps(result.to_json(), indent=1))
    else:
        print(format_result(result))
        print(f"written to {path}")
    return 0 if result.passed else 3


def _client_call(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command that calls the gateway or the sidecar: a failed call is one line on
    stderr naming what to give (a key, a CA) and exit code 1, never a traceback."""
    import grpc

    try:
        return command(args)
    except grpc.RpcError as err:
        details = err.details() if isinstance(err, grpc.Call) else str(err)
        code = err.code() if isinstance(err, grpc.Call) else None
        if code == grpc.StatusCode.UNAUTHENTICATED:
            details += (
                f" (a key: --token-file FILE or ${args.token_env}; "
                "a certificate: --cert-file and --key-file)"
            )
        elif code == grpc.StatusCode.UNAVAILABLE and args.ca_file is None:
            details += f" (if the {args.peer} serves TLS: --ca-file FILE)"
        print(f"gateway: error: {args.peer} at {args.address}: {details}", file=sys.stderr)
        return 1


def _micros(text: str | None, flag: str) -> int:
    """An ISO 8601 time as Unix microseconds (UTC unless it names its zone); 0 when absent."""
    if not text:
        return 0
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise SettingsError(f"{flag}: {text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


def _admin(args: argparse.Namespace) -> int:
    from gateway.server.admin_client import (
        AdminClient,
        format_cache,
        format_costs,
        format_routes,
        read_routes_file,
    )

    try:
        with AdminClient(args.address, _credentials(args)) as client:
            if args.command == "routes":
                if args.set:
                    text, left_out = read_routes_file(args.set)
                    if left_out:
                        print(
                            f"gateway: note: {args.set}: only routing.routes is sent; "
                            f"{', '.join(left_out)} take effect when the gateway restarts",
                            file=sys.stderr,
                        )
                    reply = client.set_routes(text, args.if_generation)
                else:
                    reply = client.routes()
                print(format_routes(reply))
            elif args.command == "promote":
                client.promote(args.route, args.variant, args.if_generation)
                print(f"{args.route}: {args.variant} takes all traffic")
            elif args.command == "rollback":
                reply = client.rollback(args.route, args.if_generation)
                print(f"{args.route}: rolled back")
                print(format_routes(reply))
            elif args.command == "threshold":
                if (args.value is None) == (args.raise_by == 0):
                    raise SettingsError("threshold: give VALUE or --raise-by (not both)")
                reply = client.set_threshold(
                    args.route, args.value, args.raise_by, args.if_generation
                )
                print(f"{args.route}: decision threshold set")
                print(format_routes(reply))
            elif args.command == "costs":
                by = tuple(g.strip() for g in args.by.split(",") if g.strip())
                unknown = set(by) - set(_GROUPS)
                if unknown or not by:
                    raise SettingsError(f"--by: choose from {', '.join(_GROUPS)}")
                since = time.time() - args.since_s if args.since_s else 0.0
                print(format_costs(client.costs(since), by))
            else:
                print(format_cache(client.cache(args.flush)))
    except BrokenPipeError:
        raise  # the reader left: main() ends quietly
    except OSError as err:  # --set FILE that does not read
        print(f"gateway: error: {err}", file=sys.stderr)
        return 2
    return 0


def _rollout(args: argparse.Namespace) -> int:
    from gateway.server.admin_client import AdminClient, format_rollout

    if args.action == "start" and not args.candidate:
        raise SettingsError("rollout start: --candidate VERSION is required")
    with AdminClient(args.address, _credentials(args)) as client:
        if args.action == "start":
            steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
            reply = client.rollout_start(args.route, args.candidate, steps)
        else:
            reply = client.rollout(args.action, args.route)
    print(reply.json if args.json else format_rollout(reply))
    return 0


def _demo_repo(args: argparse.Namespace) -> int:
    from gateway.demo import PERF_ANALYZER_DATA, build_demo_repository

    model_dir = build_demo_repository(args.directory, seed=args.seed, rows=args.rows)
    print(f"demo repository written: {model_dir}")
    print(f"perf_analyzer --input-data {args.directory / PERF_ANALYZER_DATA}")
    return 0


def _parity(args: argparse.Namespace) -> int:
    import json

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from gateway.adaptation.parity import check_parity, format_parity
    from gateway.features import load_contracts
    from gateway.settings import load_model_config

    def read(path: Path, what: str) -> Any:
        try:
            return pq.read_table(path)
        except (OSError, ValueError) as err:
            raise SettingsError(f"{what}: cannot read {path}: {err}") from None

    export = read(args.export, "--export")
    versions = sorted({str(v) for v in export.column("version").to_pylist()}, key=_as_number)
    if not versions:
        raise SettingsError(f"--export: {args.export} holds no rows")
    version = args.version or versions[-1]
    if version not in versions:
        raise SettingsError(f"--version: the export has versions {', '.join(versions)}")
    export = export.filter(pc.equal(export.column("version"), version))
    model_dir = args.repository / args.model
    contracts = load_contracts(model_dir)
    config = load_model_config(model_dir / "config.yaml")
    wanted = config.contract.for_version(int(version)) or list(contracts)[-1]
    if wanted not in contracts:
        raise SettingsError(f"contract {wanted} of version {version} is not in features.yaml")
    offline = read(args.offline, "--offline") if args.offline is not None else None
    result = check_parity(export, contracts[wanted], offline)
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_parity(result))
    return 0 if result.ok else 3


def _story(args: argparse.Namespace) -> int:
    import importlib
    import io
    import json
    import tempfile

    from gateway.stories import STORIES

    if args.name not in STORIES:
        raise SettingsError(f"story {args.name!r}: the stories are {', '.join(STORIES)}")
    story = importlib.import_module(STORIES[args.name])
    with tempfile.TemporaryDirectory(prefix=f"story-{args.name}-") as temp:
        work = args.workdir or Path(temp)
        out = io.StringIO() if args.json else sys.stdout
        signals = story.run(work, out)
    if args.json:
        print(json.dumps(signals, indent=2, default=str))
    return 0


def _as_number(text: str) -> tuple[int, str]:
    return (int(text), "") if text.isdigit() else (-1, text)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # here, not at exit: a reader gone by then is handled below too
    except BrokenPipeError:
        # The reader left early (`gateway routes | head`): end quietly, as head expects.
        # Python's own flush at exit would fail on the pipe again, so stdout goes nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return _BROKEN_PIPE_EXIT
    return code


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args, argv)
        if args.command == "sidecar":
            return _sidecar(args)
        if args.command in ("actions", "review", "triggers"):
            return _client_call(_adaptation, args)
        if args.command in ("labels", "export", "report", "verdict", "validate"):
            command = {
                "labels": _labels,
                "export": _export,
                "report": _report,
                "verdict": _verdict,
                "validate": _validate,
            }[args.command]
            return _client_call(command, args)
        if args.command in ("routes", "promote", "rollback", "threshold", "costs", "cache"):
            return _client_call(_admin, args)
        if args.command == "rollout":
            return _client_call(_rollout, args)
        if args.command == "parity":
            return _parity(args)
        if args.command == "story":
            return _story(args)
        return _demo_repo(args)
    except (SettingsError, ModelLoadError) as err:
        print(f"gateway: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
