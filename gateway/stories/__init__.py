"""Runnable failure stories (`gateway story NAME`): each sets up the demo, runs traffic through a
real gateway and sidecar, and prints what a person would see and where."""

from __future__ import annotations

__all__ = ["STORIES"]

# name -> module (imported when the story runs: each pulls in the demo and the clients)
STORIES = {
    "new-vertical": "gateway.stories.new_vertical",
    "skew": "gateway.stories.skew",
    "invisible-cost": "gateway.stories.invisible_cost",
    "drift-that-matters": "gateway.stories.drift_that_matters",
}
