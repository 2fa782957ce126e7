"""Stage 6: check request tensors against a model version's signature and bind them as feeds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from gateway.errors import InvalidRequest
from gateway.runtime.repository import LoadedVersion
from gateway.types import Tensor, TensorSpec

__all__ = ["bind_inputs", "select_outputs", "to_output_tensor"]


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _as_onnx_strings(tensor: Tensor) -> NDArray[np.generic]:
    """ONNX Runtime string tensors take ``str``; OIP BYTES carry ``bytes``."""
    flat = tensor.data.reshape(-1)
    out = np.empty(flat.shape, dtype=object)
    for i, item in enumerate(flat):
        try:
            out[i] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        except UnicodeDecodeError:
            raise InvalidRequest(
                f"input '{tensor.name}' element {i} is not valid UTF-8, which the model's "
                "string input requires"
            ) from None
    return out.reshape(tensor.data.shape)


class _Label:
    """Names the model version in an error message; formatted only when one is raised."""

    __slots__ = ("loaded",)

    def __init__(self, loaded: LoadedVersion) -> None:
        self.loaded = loaded

    def __str__(self) -> str:
        return f"model '{self.loaded.name}' version {self.loaded.version}"


def bind_inputs(
    loaded: LoadedVersion, inputs: Sequence[Tensor]
) -> tuple[dict[str, NDArray[np.generic]], int]:
    """Validate every input against the model signature; return the feeds and the row count."""
    label = _Label(loaded)
    specs = loaded.input_specs
    given = {t.name: t for t in inputs}
    if len(given) != len(inputs):
        dup = next(t.name for t in inputs if sum(u.name == t.name for u in inputs) > 1)
        raise InvalidRequest(f"input '{dup}' is given more than once")
    for name in given:
        if name not in specs:
            raise InvalidRequest(
                f"unexpected input '{name}': {label} takes {', '.join(sorted(specs))}"
            )
    max_batch = loaded.config.max_batch_size
    rows: int | None = None
    feeds: dict[str, NDArray[np.generic]] = {}
    for name, spec in specs.items():
        tensor = given.get(name)
        if tensor is None:
            raise InvalidRequest(f"missing input '{name}' required by {label}")
        if tensor.datatype != spec.datatype:
            raise InvalidRequest(
                f"input '{name}' has datatype {tensor.datatype} but {label} expects {spec.datatype}"
            )
        _check_shape(tensor, spec, label)
        if max_batch > 0:
            n = tensor.shape[0]
            if rows is not None and n != rows:
                raise InvalidRequest(
                    f"input '{name}' has {n} rows but the other inputs have {rows}"
                )
            rows = n  # more than max_batch_size is fine: the scheduler cuts it into batches
        feeds[name] = _as_onnx_strings(tensor) if spec.datatype == "BYTES" else tensor.data
    return feeds, 1 if rows is None else rows


def _check_shape(tensor: Tensor, spec: TensorSpec, label: _Label) -> None:
    shape = tensor.shape
    if len(shape) != len(spec.shape):
        ok = False
    else:
        ok = True
        for want, got in zip(spec.shape, shape, strict=True):
            if want >= 0 and want != got:
                ok = False
                break
    if not ok:
        raise InvalidRequest(
            f"input '{tensor.name}' has shape {_shape_text(shape)} but {label} expects "
            f"{_shape_text(spec.shape)} (-1 = any size)"
        )


def select_outputs(loaded: LoadedVersion, requested: Sequence[str]) -> list[TensorSpec]:
    """The outputs to return: those requested (in request order), or all of them."""
    if not requested:
        return list(loaded.runtime.outputs)
    specs = loaded.output_specs
    for name in requested:
        if name not in specs:
            raise InvalidRequest(
                f"requested output '{name}' is not an output of model '{loaded.name}' "
                f"(outputs: {', '.join(specs)})"
            )
    return [specs[name] for name in requested]


def to_output_tensor(spec: TensorSpec, array: NDArray[np.generic]) -> Tensor:
    if spec.datatype == "BYTES":
        flat = [str(s).encode("utf-8") for s in array.reshape(-1)]
        data = np.empty(len(flat), dtype=object)
        data[:] = flat
        array = data.reshape(array.shape)
    return Tensor(spec.name, spec.datatype, array)
