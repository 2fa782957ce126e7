"""What a route looks like at each step of a rollout: pure functions of the route's spec from
before the rollout, so any step (and the way back) can be rebuilt after a restart."""

from __future__ import annotations

from gateway.errors import InvalidRequest
from gateway.settings import RouteSpec, ShadowSpec, VariantSpec

__all__ = ["SHADOW", "candidate_variant", "stable_variant", "step_spec"]

SHADOW = "shadow"


def stable_variant(route: str, spec: RouteSpec) -> VariantSpec:
    """The variant answering the route now: its one weighted model variant, or InvalidRequest
    (a split or a static answer has no single stable version to walk away from)."""
    weighted = [v for v in spec.variants if v.weight > 0]
    if len(weighted) != 1 or weighted[0].model is None:
        names = ", ".join(f"{v.name} ({v.weight:g})" for v in weighted)
        raise InvalidRequest(
            f"route '{route}': a rollout starts from one weighted model variant, the stable "
            f"one; this route splits its traffic: {names} (promote one first)"
        )
    if spec.match:
        raise InvalidRequest(
            f"route '{route}': its match rules pick variants outright; a rollout's weights "
            "would not reach their requests (set the route without them first)"
        )
    return weighted[0]


def candidate_variant(route: str, spec: RouteSpec, candidate: str) -> VariantSpec:
    """The variant serving version ``candidate`` of the stable variant's model: the route's
    own where it has one, else a copy of the stable variant named ``v<candidate>``."""
    stable = stable_variant(route, spec)
    if candidate == stable.version:
        raise InvalidRequest(
            f"route '{route}': version {candidate} is the stable one (variant {stable.name})"
        )
    for variant in spec.variants:
        if (
            variant.model == stable.model
            and variant.endpoint == stable.endpoint
            and variant.version == candidate
        ):
            return variant
    name = f"v{candidate}"
    if any(v.name == name for v in spec.variants):
        raise InvalidRequest(
            f"route '{route}': a variant named '{name}' serves something else than version "
            f"{candidate} of model '{stable.model}'; rename it first"
        )
    return stable.model_copy(update={"name": name, "version": candidate, "weight": 0.0})


def step_spec(route: str, original: RouteSpec, candidate: str, step: str) -> RouteSpec:
    """The route at ``step``: ``shadow`` (the stable answers, the candidate scores a copy of
    every request), a canary percentage (the candidate answers that share of the traffic),
    or ``100`` (the candidate takes all of it, as ``promote`` does: it is the stable one)."""
    stable = stable_variant(route, original)
    chosen = candidate_variant(route, original, candidate)
    variants = [v for v in original.variants if v.name != chosen.name]
    shadows = tuple(s for s in original.shadows if s.variant != chosen.name)
    if step == SHADOW:
        variants.append(chosen.model_copy(update={"weight": 0.0}))
        shadows += (ShadowSpec(variant=chosen.name, sample=1.0),)
    else:
        percent = float(step)
        if percent >= 100:
            variants = [v.model_copy(update={"weight": 0.0}) for v in variants]
            variants.append(chosen.model_copy(update={"weight": 1.0, "arm": "primary"}))
        else:
            variants = [
                v.model_copy(update={"weight": 100.0 - percent}) if v.name == stable.name else v
                for v in variants
            ]
            variants.append(chosen.model_copy(update={"weight": percent, "arm": "canary"}))
    spec = original.model_copy(update={"variants": tuple(variants), "shadows": shadows})
    return RouteSpec.model_validate(spec.model_dump())  # model_copy checks nothing
