"""Stage 2, routing: a logical model name -> the variant that answers it.

A route's variants split its traffic by weight. The split is sticky: a request with a
``sticky_key`` parameter lands on the arm its key hashes to (xxh3 of route and key, the same
across requests, processes and restarts, so long as the weights stay); one without draws at
random. Match rules on request parameters come first and pick a variant outright.

Each Route is immutable: set, promote and rollback put a new one in its place, so a request
in flight keeps the route it started with, and every change happens on the loop.

Its ``generation`` bumps on every change; ``document()``/``adopt()`` carry the whole table
(routes, revisions, rollback history, generation) as JSON-able data, the form replicas share
it in (state.backend: redis).
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections import deque
from collections.abc import Callable, Collection, Mapping
from typing import Any

import xxhash

from gateway.errors import FailedPrecondition, InvalidRequest, ModelNotFound, RevisionConflict
from gateway.settings import RouteSpec, VariantSpec
from gateway.types import RequestOptions

__all__ = ["Route", "RouteTable", "unit_hash"]

_TWO_64 = float(2**64)


def unit_hash(route: str, key: str) -> float:
    """``key``'s place in [0, 1) on ``route``: uniform, and the same on every machine."""
    return xxhash.xxh3_64_intdigest(f"{route}\x00{key}".encode()) / _TWO_64


class Route:
    """One route as it is in force: its spec, and the weights laid out for a draw."""

    __slots__ = ("_cumulative", "_weighted", "chains", "name", "revision", "spec", "variants")

    def __init__(self, name: str, spec: RouteSpec, revision: int) -> None:
        self.name = name
        self.spec = spec
        self.revision = revision  # bumps on every change: tells a client what it looks at
        self.variants: dict[str, VariantSpec] = {v.name: v for v in spec.variants}
        self._weighted = [v for v in spec.variants if v.weight > 0]
        self._cumulative = list(itertools.accumulate(v.weight for v in self._weighted))
        # Per variant: it, then the route's fallbacks in order (without it).
        self.chains: dict[str, tuple[VariantSpec, ...]] = {
            v.name: (v, *(self.variants[n] for n in spec.fallbacks if n != v.name))
            for v in spec.variants
        }

    def choose(self, options: RequestOptions) -> VariantSpec:
        labels = options.labels
        for rule in self.spec.match:
            if all(labels.get(k) == v for k, v in rule.when.items()):
                return self.variants[rule.variant]
        key = options.sticky_key
        point = random.random() if key is None else unit_hash(self.name, key)
        total = self._cumulative[-1]
        index = bisect.bisect_right(self._cumulative, point * total)
        return self._weighted[min(index, len(self._weighted) - 1)]

    def variant(self, name: str) -> VariantSpec:
        try:
            return self.variants[name]
        except KeyError:
            raise ModelNotFound(
                f"route '{self.name}' has no variant '{name}' (variants: "
                f"{', '.join(self.variants)})"
            ) from None


class RouteTable:
    """The routes in force, and each route's earlier specs for rollback (bounded)."""

    def __init__(self, routes: Mapping[str, RouteSpec], history: int) -> None:
        self._next_revision = 1
        self._routes: dict[str, Route] = {}
        self._history: dict[str, deque[RouteSpec | None]] = {}
        self._keep = history
        self.generation = 1
        for name, spec in routes.items():  # the starting table: nothing before it to restore
            self._install(name, spec)

    def expect(self, generation: int) -> None:
        """RevisionConflict unless the table is at ``generation`` (0: any)."""
        if generation and generation != self.generation:
            raise RevisionConflict(
                f"the routes changed since generation {generation} (now {self.generation}): "
                "read them again, then retry"
            )

    def document(self) -> dict[str, Any]:
        """The whole table as JSON-able data (``adopt`` takes it back)."""
        return {
            "generation": self.generation,
            "next_revision": self._next_revision,
            "routes": {
                name: {"spec": _dump(r.spec), "revision": r.revision}
                for name, r in self._routes.items()
            },
            "history": {name: [_dump(s) for s in h] for name, h in self._history.items()},
        }

    def adopt(self, document: Mapping[str, Any]) -> list[str]:
        """Take the table ``document`` describes (another replica's change); returns the
        names of the routes whose spec changed."""
        routes = {
            name: Route(name, RouteSpec.model_validate(entry["spec"]), int(entry["revision"]))
            for name, entry in document["routes"].items()
        }
        changed = sorted(
            name
            for name in set(routes) | set(self._routes)
            if (old := self._routes.get(name)) is None
            or (new := routes.get(name)) is None
            or old.revision != new.revision
        )
        self._history = {
            name: deque((_load(raw) for raw in specs), maxlen=self._keep)
            for name, specs in document["history"].items()
        }
        self._routes = routes
        self._next_revision = int(document["next_revision"])
        self.generation = int(document["generation"])
        return changed

    def get(self, name: str) -> Route | None:
        return self._routes.get(name)

    def all(self) -> dict[str, Route]:
        return dict(self._routes)

    def replace(self, routes: Mapping[str, RouteSpec]) -> list[str]:
        """Put ``routes`` in force (others are removed); returns the names that changed."""
        changed = []
        for name in sorted(set(self._routes) | set(routes)):
            old = self._routes.get(name)
            new = routes.get(name)
            if old is not None and new is not None and old.spec == new:
                continue
            self._set(name, new)
            changed.append(name)
        return changed

    def promote(self, name: str, variant: str) -> Route:
        """``variant`` takes all of the route's traffic (its match rules go too)."""
        route = self._existing(name)
        chosen = route.variant(variant)
        if chosen.output is not None:
            raise InvalidRequest(f"variant '{variant}' is static; promote a model variant")
        variants = tuple(
            v.model_copy(
                update={"weight": 1.0, "arm": "primary"} if v.name == variant else {"weight": 0.0}
            )
            for v in route.spec.variants
        )
        spec = route.spec.model_copy(update={"variants": variants, "match": ()})
        return self._set(name, spec)

    def set_threshold(self, name: str, threshold: float | None, raise_by: float) -> Route:
        """The route's decision threshold set to ``threshold``, or raised by ``raise_by`` no
        higher than its ``max_threshold``."""
        route = self._existing(name)
        decision = route.spec.decision
        if decision is None:
            raise FailedPrecondition(
                f"route '{name}' has no decision threshold (give it decision: {{output, "
                "threshold}} first)"
            )
        if threshold is None:
            if decision.threshold >= decision.max_threshold:
                raise FailedPrecondition(
                    f"route '{name}': its decision threshold {decision.threshold:g} is at its "
                    f"max_threshold {decision.max_threshold:g}"
                )
            threshold = min(decision.max_threshold, decision.threshold + raise_by)
        changed = decision.model_copy(update={"threshold": threshold})
        return self._set(name, route.spec.model_copy(update={"decision": changed}))

    def rollback(self, name: str) -> Route | None:
        """Restore the route's previous spec (None: the route did not exist before). What
        serves goes back; its decision threshold stays as it is now: a threshold change is
        stepped over (``gateway threshold`` sets it, ``tighten_thresholds`` raises it)."""
        history = self._history.get(name) or deque()
        current = self._routes.get(name)
        now = None if current is None else _serving(current.spec)
        back = len(history) - 1
        while back >= 0 and now is not None and _serving(history[back]) == now:
            back -= 1
        if back < 0:
            raise ModelNotFound(f"route '{name}' has no earlier spec to roll back to")
        previous = history[back]
        for _ in range(len(history) - back):
            history.pop()
        if previous is not None and current is not None:
            previous = _deciding_as(previous, current)
        self._install(name, previous)
        self.generation += 1
        return self._routes.get(name)

    def serve(self, name: str, spec: RouteSpec) -> Route:
        """``spec`` serves on the existing route ``name``, its decision threshold kept as it
        is now (a rollout's steps change what serves, not the threshold); a revision only
        when that changes anything."""
        route = self._existing(name)
        spec = _deciding_as(spec, route)
        return route if route.spec == spec else self._set(name, spec)

    def _set(self, name: str, spec: RouteSpec | None) -> Route:
        old = self._routes.get(name)
        history = self._history.setdefault(name, deque(maxlen=self._keep))
        history.append(None if old is None else old.spec)
        self._install(name, spec)
        self.generation += 1
        return self._routes.get(name)  # type: ignore[return-value]

    def _install(self, name: str, spec: RouteSpec | None) -> None:
        if spec is None:
            self._routes.pop(name, None)
        else:
            self._routes[name] = Route(name, spec, self._next_revision)
            self._next_revision += 1

    def _existing(self, name: str) -> Route:
        route = self._routes.get(name)
        if route is None:
            raise ModelNotFound(f"no route named '{name}' (routes: {', '.join(self._routes)})")
        return route


def _dump(spec: RouteSpec | None) -> dict[str, Any] | None:
    return None if spec is None else spec.model_dump(mode="json")


def _load(raw: Mapping[str, Any] | None) -> RouteSpec | None:
    return None if raw is None else RouteSpec.model_validate(raw)


def _deciding_as(spec: RouteSpec, route: Route) -> RouteSpec:
    """``spec`` with ``route``'s decision threshold as it is now."""
    return spec.model_copy(update={"decision": route.spec.decision})


def _serving(spec: RouteSpec | None) -> RouteSpec | None:
    """What of a spec serves: all of it but its decision threshold."""
    return None if spec is None else spec.model_copy(update={"decision": None})


def decision_problems(
    routes: Mapping[str, RouteSpec], outputs: Callable[[str], Collection[str]]
) -> list[str]:
    """What is wrong with the routes' decision thresholds against the models they serve
    (``outputs``: a model's output names, empty when it is not loaded), each naming its field:
    a score output the model lacks, a decision named as one of its outputs."""
    problems = []
    for name, spec in routes.items():
        decision = spec.decision
        if decision is None:
            continue
        for variant in spec.variants:
            model = variant.local_model
            names = outputs(model) if model is not None else ()
            if not names:
                continue
            if decision.output not in names:
                problems.append(
                    f"{name}.decision.output: '{decision.output}' is not an output of model "
                    f"'{model}' (outputs: {', '.join(sorted(names))})"
                )
            if decision.name in names:
                problems.append(
                    f"{name}.decision.name: '{decision.name}' is an output of model '{model}'"
                )
    return sorted(set(problems))
