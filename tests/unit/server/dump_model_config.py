"""ModelConfig and ModelMetadata of every version a repository loads, as test_model_config.py
reads them: run as a child process, since the gateway's generated messages cannot share one
with tritonclient's (tests/conftest.py).

``python -m tests.unit.server.dump_model_config ROOT [PROVIDER]`` loads ROOT with real ONNX
Runtime sessions (PROVIDER, when given, replaces the provider they report) and prints JSON:
``{"<model>/<version>": {"config": <base64>, "metadata": <base64>}}``, the serialized messages.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.features import model_contracts
from gateway.runtime.repository import ModelRepository
from gateway.runtime.session import OnnxRuntimeSession, SessionOptions
from gateway.server.model_config import config_to_pb, metadata_to_pb
from gateway.settings import RuntimeSettings


async def dump(root: Path, provider: str | None) -> dict[str, dict[str, str]]:
    def session(path: Path, options: SessionOptions) -> OnnxRuntimeSession:
        created = OnnxRuntimeSession(path, options)
        if provider is not None:
            created.provider = provider
        return created

    with ThreadPoolExecutor(max_workers=1) as executor:
        repository = ModelRepository(
            root, RuntimeSettings(), executor, session, contracts=model_contracts
        )
        await repository.load_all()
        described = {}
        for loaded in repository.loaded():
            config = config_to_pb(loaded).SerializeToString()
            metadata = metadata_to_pb(loaded, repository.versions(loaded.name)).SerializeToString()
            described[f"{loaded.name}/{loaded.version}"] = {
                "config": base64.b64encode(config).decode(),
                "metadata": base64.b64encode(metadata).decode(),
            }
        return described


if __name__ == "__main__":
    provider = sys.argv[2] if len(sys.argv) > 2 else None
    print(json.dumps(asyncio.run(dump(Path(sys.argv[1]), provider))))
