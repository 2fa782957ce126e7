"""Command-line clients of the admin service: ``gateway routes|promote|rollback|costs|cache``
and ``gateway rollout``;
each presents ``ClientCredentials`` (the admin token or an admin key, TLS, a certificate)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.api.v1 import admin_pb2 as pb
from gateway.api.v1 import admin_pb2_grpc as pb_grpc
from gateway.auth import ClientCredentials
from gateway.errors import SettingsError
from gateway.settings import Settings, bounded_yaml
from gateway.tables import format_table

__all__ = [
    "AdminClient",
    "format_cache",
    "format_costs",
    "format_rollout",
    "format_routes",
    "read_routes_file",
]


class AdminClient:
    """The admin service at ``url`` (HOST:PORT). ``credentials`` given as a bare string is a
    key presented over plain TCP: ``ClientCredentials(key)``. SettingsError when the TLS files
    do not read."""

    def __init__(
        self,
        url: str,
        credentials: ClientCredentials | str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        if not isinstance(credentials, ClientCredentials):
            credentials = ClientCredentials(credentials)
        self._metadata = credentials.metadata
        self._channel = credentials.channel(url, "gateway")
        self._stub = pb_grpc.GatewayAdminStub(self._channel)  # type: ignore[no-untyped-call]
        self._timeout_s = timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: object) -> object:
        return getattr(self._stub, method)(
            request, metadata=self._metadata, timeout=self._timeout_s
        )

    def routes(self) -> pb.Routes:
        return self._call("GetRoutes", pb.GetRoutesRequest())  # type: ignore[return-value]

    # ``expected_generation`` (> 0): change only the table of that generation (as last read),
    # else FAILED_PRECONDITION; 0: whatever it is now.

    def set_routes(self, text: str, expected_generation: int = 0) -> pb.Routes:
        request = pb.SetRoutesRequest(yaml=text, expected_generation=expected_generation)
        return self._call("SetRoutes", request)  # type: ignore[return-value]

    def promote(self, route: str, variant: str, expected_generation: int = 0) -> pb.Routes:
        request = pb.PromoteRequest(
            route=route, variant=variant, expected_generation=expected_generation
        )
        return self._call("Promote", request)  # type: ignore[return-value]

    def rollback(self, route: str, expected_generation: int = 0) -> pb.Routes:
        request = pb.RollbackRequest(route=route, expected_generation=expected_generation)
        return self._call("Rollback", request)  # type: ignore[return-value]

    def set_threshold(
        self,
        route: str,
        threshold: float | None = None,
        raise_by: float = 0.0,
        expected_generation: int = 0,
    ) -> pb.Routes:
        request = pb.ThresholdRequest(
            route=route, raise_by=raise_by, expected_generation=expected_generation
        )
        if threshold is not None:
            request.threshold = threshold
        return self._call("SetThreshold", request)  # type: ignore[return-value]

    def costs(self, since: float = 0.0) -> pb.CostsResponse:
        return self._call("Costs", pb.CostsRequest(since=since))  # type: ignore[return-value]

    def cache(self, flush: bool = False) -> pb.CacheResponse:
        return self._call("Cache", pb.CacheRequest(flush=flush))  # type: ignore[return-value]

    def rollout_start(self, route: str, candidate: str, steps: tuple[str, ...] = ()) -> pb.Rollout:
        request = pb.RolloutStartRequest(route=route, candidate=candidate, steps=steps)
        return self._call("RolloutStart", request)  # type: ignore[return-value]

    def rollout(self, action: str, route: str) -> pb.Rollout:
        """``action``: status, pause, resume or abort."""
        method = f"Rollout{action.capitalize()}"
        return self._call(method, pb.RolloutRequest(route=route))  # type: ignore[return-value]


def read_routes_file(path: Path) -> tuple[str, list[str]]:
    """The route table in ``path`` as SetRoutes takes it (YAML), and what of the file is left
    out. The file is either a mapping of routes (what ``gateway routes`` prints) or a settings
    file, whose ``routing.routes`` is taken and nothing else (the rest is named, to say so).
    SettingsError naming the file for anything else; OSError when it does not read."""
    text = path.read_text()
    try:
        tree = bounded_yaml(text, str(path))
    except yaml.YAMLError as err:
        raise SettingsError(f"{path}: not YAML: {err}") from None
    except ValueError as err:
        raise SettingsError(str(err)) from None
    wanted = (
        "a mapping of routes (as `gateway routes` prints it) or a settings file with routing.routes"
    )
    if tree is None:
        raise SettingsError(f"{path}: empty; to remove every route, give {{}}")
    if not isinstance(tree, dict):
        raise SettingsError(f"{path}: a YAML {_kind(tree)}, not {wanted}")
    if "routing" not in tree or _is_route(tree["routing"]):  # a route may be named routing
        sections = set(Settings.model_fields)
        if not tree or not set(tree) <= sections or any(_is_route(v) for v in tree.values()):
            return text, []  # routes (SetRoutes names the key of any that is not one)
        raise SettingsError(
            f"{path}: settings ({', '.join(map(str, tree))}) without routing.routes; give {wanted}"
        )
    routing = tree["routing"]
    routes = routing.get("routes") if isinstance(routing, dict) else None
    if not isinstance(routes, dict):
        raise SettingsError(f"{path}: routing has no routes mapping; give {wanted}")
    left_out = [f"routing.{key}" for key in routing if key != "routes"]
    left_out += [str(key) for key in tree if key != "routing"]
    return yaml.safe_dump(routes, sort_keys=False), left_out


def _is_route(value: object) -> bool:
    return isinstance(value, dict) and "variants" in value


def _kind(value: object) -> str:
    return {list: "list", str: "string", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )


def format_routes(reply: pb.Routes) -> str:
    """The route table as ``gateway routes`` prints it: its generation and each route's
    revision as comments, then the routes' YAML (a file ``gateway routes --set`` takes)."""
    lines = [f"# generation {reply.generation}"]
    lines += [f"# {name}: revision {reply.revisions[name]}" for name in sorted(reply.revisions)]
    lines.append(reply.yaml.rstrip() or "{}  # no routes")
    return "\n".join(lines)


@dataclass
class _Spend:
    """What the ledger lines of one group add up to."""

    requests: int = 0
    rows: int = 0
    cached_rows: int = 0
    compute_s: float = 0.0
    cost: float = 0.0

    def add(self, line: pb.CostLine) -> None:
        self.requests += line.requests
        self.rows += line.rows
        self.cached_rows += line.cached_rows
        self.compute_s += line.compute_s
        self.cost += line.cost

    def cells(self) -> list[str]:
        """The table cells, in the header's order: requests, rows, cached, compute_s, cost."""
        return [
            f"{self.requests:.0f}",
            f"{self.rows:.0f}",
            f"{self.cached_rows:.0f}",
            f"{self.compute_s:.6f}",
            f"{self.cost:.6g}",
        ]


def format_costs(reply: pb.CostsResponse, by: tuple[str, ...]) -> str:
    """The ledger summed by ``by`` (some of tenant, route, variant, surface), and budgets."""
    sums: dict[tuple[str, ...], _Spend] = defaultdict(_Spend)
    for line in reply.lines:
        sums[tuple(getattr(line, field) or "-" for field in by)].add(line)
    header = [*by, "requests", "rows", "cached", "compute_s", "cost"]
    table = [header]
    for key in sorted(sums):
        table.append([*key, *sums[key].cells()])
    lines = format_table(table) if len(table) > 1 else ["no requests in the ledger"]
    if reply.budgets:
        lines.append("")
        budgets = [["budget", "subject", "spent", "limit", "window_s", "renews_in_s", "policy"]]
        now = time.time()
        for b in reply.budgets:
            budgets.append(
                [
                    b.name,
                    f"{b.subject}={b.value}",
                    f"{b.spent:.6g}",
                    f"{b.limit:.6g}",
                    str(b.window_s),
                    f"{b.window_start + b.window_s - now:.0f}",
                    b.policy,
                ]
            )
        lines += format_table(budgets)
    return "\n".join(lines)


def format_cache(reply: pb.CacheResponse) -> str:
    if not reply.enabled:
        return "response cache: off (cache.enabled false)"
    lookups = reply.hits + reply.misses
    rate = reply.hits / lookups if lookups else 0.0
    text = (
        f"rows {reply.entries}, {reply.bytes} of {reply.max_bytes} bytes; hits {reply.hits}, "
        f"misses {reply.misses} (hit rate {rate:.1%}), coalesced {reply.coalesced}, "
        f"evictions {reply.evictions}, collisions {reply.collisions}"
    )
    if reply.flushed:
        text += f"\nflushed {reply.flushed} rows"
    return text


def format_rollout(reply: pb.Rollout) -> str:
    """A rollout as a person reads it: where it is, why, the last verdict's criteria, and
    the steps taken."""
    record = json.loads(reply.json)
    steps = " -> ".join(
        f"[{step}]" if i == reply.step else step for i, step in enumerate(reply.steps)
    )
    lines = [
        f"{reply.route}: version {reply.candidate} ({record['variant']}) {reply.state.upper()}",
        f"  steps: {steps}",
        f"  reason: {reply.reason}",
    ]
    health = record.get("health")
    if health:
        lines.append(
            f"  candidate at this step: {health['attempts']} attempts, {health['failed']} "
            f"failed, {health['slow']} slow (adaptation.rollout.slo)"
        )
    verdict = record.get("verdict")
    if verdict:
        lines.append(f"  last verdict: {verdict['verdict']} at step {verdict['step']}")
        table = [
            ["criterion", "outcome", "stable", "candidate", "regression", "interval", "allowed"]
        ]
        for c in verdict.get("criteria", []):
            table.append(
                [
                    str(c.get("name", "")),
                    str(c.get("outcome", "")),
                    _number(c.get("stable")),
                    _number(c.get("candidate")),
                    _percent(c.get("regression")),
                    f"[{_percent(c.get('regression_low'))}, {_percent(c.get('regression_high'))}]",
                    _percent(c.get("allowed")),
                ]
            )
        lines += format_table(table, indent="    ")
    lines.append("  history:")
    for entry in record.get("history", []):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["at"]))
        lines.append(f"    {when} r{entry['revision']} {entry['step']}: {entry['reason']}")
    return "\n".join(lines)


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else "-"


def _percent(value: object) -> str:
    return f"{value:+.1%}" if isinstance(value, int | float) else "-"
