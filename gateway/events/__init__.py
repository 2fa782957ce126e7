"""Stage 7: prediction events. Every answered prediction is recorded off the request path,
appended to a write-ahead log on local disk and streamed to the evaluation sidecar."""

from gateway.events.builder import Pending, build_event
from gateway.events.recorder import EventRecorder
from gateway.events.wal import WriteAheadLog

__all__ = ["EventRecorder", "Pending", "WriteAheadLog", "build_event"]
