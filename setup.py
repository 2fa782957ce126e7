"""Build hooks: generate the gRPC modules from protos/ and compile the Cython kernels in native/."""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTOS = ROOT / "protos"


def generate_protos() -> None:
    """Run grpc_tools.protoc over protos/ into the source tree (editable installs see it too)."""
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {sources}")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


def extensions() -> list[Extension]:
    import numpy
    from Cython.Build import cythonize

    # Headers every module cimports (native/_wire.pxd): a change to one rebuilds them all.
    headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "native").glob("*.pxd"))
    # The kernels read numpy arrays through numpy's C API (raw pointers, no per-call views).
    modules = [
        Extension(
            f"gateway.{pyx.stem}",
            [str(pyx.relative_to(ROOT))],
            include_dirs=[numpy.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            depends=headers,
        )
        for pyx in sorted((ROOT / "native").glob("*.pyx"))
    ]
    return cythonize(
        modules,
        include_path=["native"],
        language_level="3",
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
        quiet=True,
    )


if __name__ == "__main__":
    os.chdir(ROOT)
    setup(ext_modules=extensions(), cmdclass={"build_py": BuildPyWithProtos})
