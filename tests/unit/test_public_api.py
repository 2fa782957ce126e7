"""The public API is pinned: a change to it is a deliberate edit here."""

import gateway


def test_public_names_are_pinned():
    assert sorted(gateway.__all__) == [
        "DeadlineExceeded",
        "Gateway",
        "GatewayError",
        "InvalidRequest",
        "ModelLoadError",
        "ModelNotFound",
        "ModelNotReady",
        "Overloaded",
        "RuntimeFailure",
        "Settings",
        "SettingsError",
        "__version__",
        "load_settings",
    ]


def test_errors_carry_their_grpc_status():
    import grpc

    assert gateway.InvalidRequest.grpc_status == grpc.StatusCode.INVALID_ARGUMENT
    assert gateway.ModelNotFound.grpc_status == grpc.StatusCode.NOT_FOUND
    assert gateway.ModelNotReady.grpc_status == grpc.StatusCode.UNAVAILABLE
    assert gateway.Overloaded.grpc_status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert gateway.DeadlineExceeded.grpc_status == grpc.StatusCode.DEADLINE_EXCEEDED
    assert gateway.RuntimeFailure.grpc_status == grpc.StatusCode.INTERNAL
