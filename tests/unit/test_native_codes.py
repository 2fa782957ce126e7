"""The facts the native modules hard-code (C enums, for speed) agree with where each is defined:
the feature kernel's codes with gateway/features/_plan.py, the event encoder's field keys with
events.proto's descriptors. Both read what the built modules expose, so a stale build fails too.
"""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.descriptor import Descriptor, FieldDescriptor  # type: ignore[import-untyped]

from gateway.api.v1 import events_pb2 as ev
from gateway.features import _plan
from gateway.types import OUTCOMES

try:
    from gateway import _events_c, _features_c
except ImportError:  # the tests below then fail loudly instead of being skipped
    _events_c = _features_c = None

# _plan's codes: the kernel's kinds, range policies, steps, errors and coverage columns.
CODE_NAMES = ("NUMERIC", "CATEGORICAL")
CODE_PREFIXES = ("RANGE_", "STEP_", "ERROR_", "COUNT_")


def plan_codes() -> dict[str, int]:
    return {
        name: value
        for name, value in vars(_plan).items()
        if (name in CODE_NAMES or name.startswith(CODE_PREFIXES)) and isinstance(value, int)
    }


def test_the_native_kernel_has_each_of_plans_codes_with_its_value():
    assert _features_c is not None, "gateway._features_c is not built: run `make native`"
    assert len(plan_codes()) >= 17  # the filter above still finds them
    assert plan_codes() == _features_c.CODES


def test_coverage_columns_are_in_outcomes_order():
    columns = {outcome: getattr(_plan, f"COUNT_{outcome.upper()}") for outcome in OUTCOMES}
    assert columns == {outcome: i for i, outcome in enumerate(OUTCOMES)}


# Wire types: 0 varint, 1 64-bit, 2 length-delimited, 5 32-bit.
_FIXED = {
    FieldDescriptor.TYPE_DOUBLE: 1,
    FieldDescriptor.TYPE_FIXED64: 1,
    FieldDescriptor.TYPE_SFIXED64: 1,
    FieldDescriptor.TYPE_FLOAT: 5,
    FieldDescriptor.TYPE_FIXED32: 5,
    FieldDescriptor.TYPE_SFIXED32: 5,
    FieldDescriptor.TYPE_STRING: 2,
    FieldDescriptor.TYPE_BYTES: 2,
    FieldDescriptor.TYPE_MESSAGE: 2,
}
# Set by the sidecar when it stores an event, never by the gateway.
NOT_WRITTEN = {"PredictionEvent.arrival_time_us"}


def wire_type(field: FieldDescriptor) -> int:
    if field.label == FieldDescriptor.LABEL_REPEATED and field.is_packed:
        return 2
    return _FIXED.get(field.type, 0)


def fields(message: Descriptor) -> Iterator[tuple[str, FieldDescriptor]]:
    """Every field of the message and of the messages it holds, as Message.field."""
    name = message.full_name.removeprefix(f"{message.file.package}.")
    for field in message.fields:
        yield f"{name}.{field.name}", field
        if field.message_type is not None:
            yield from fields(field.message_type)


def test_the_event_encoder_writes_each_field_with_the_protos_number_and_wire_type():
    assert _events_c is not None, "gateway._events_c is not built: run `make native`"
    expected = {
        path: (field.number, wire_type(field))
        for path, field in fields(ev.PredictionEvent.DESCRIPTOR)
        if path not in NOT_WRITTEN
    }
    assert len(expected) > 30  # the nested messages are walked too
    written = {path: divmod(key, 8) for path, key in _events_c.FIELD_KEYS.items()}
    assert written == expected
