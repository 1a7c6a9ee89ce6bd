"""Generates gen/ from protos/: messages, gRPC stubs, type stubs and Envoy's descriptor set.

Run with `make gen`. The test suite generates into a temporary folder and compares it with gen/,
so the committed code can never drift from the protos.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
DESCRIPTOR_SET_NAME = "lmcluster.pb"


def googleapis_include_dir() -> Path:
    """The folder holding google/api/*.proto, shipped by googleapis-common-protos."""
    spec = importlib.util.find_spec("google.api.annotations_pb2")
    if spec is None or spec.origin is None:
        raise RuntimeError("googleapis-common-protos is not installed")
    return Path(spec.origin).parent.parent.parent


def well_known_include_dir() -> Path:
    """The folder holding google/protobuf/*.proto, shipped by grpcio-tools."""
    return Path(grpc_tools.__file__).parent / "_proto"


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))


def include_args() -> list[str]:
    return [f"-I{PROTO_ROOT}", f"-I{googleapis_include_dir()}", f"-I{well_known_include_dir()}"]


def _mypy_grpc_plugin() -> str:
    plugin = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    found = str(plugin) if plugin.exists() else shutil.which("protoc-gen-mypy_grpc")
    if not found:
        raise RuntimeError("protoc-gen-mypy_grpc not found: install the dev extra (mypy-protobuf)")
    return found


def _run_protoc(args: list[str]) -> None:
    code = protoc.main(["grpc_tools.protoc", *args])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")


def generate(out_dir: Path) -> None:
    """Writes the generated tree into out_dir (which is emptied first)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    files = proto_files()
    _run_protoc(
        [
            *include_args(),
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--plugin=protoc-gen-mypy_grpc={_mypy_grpc_plugin()}",
            f"--mypy_grpc_out={out_dir}",
            *files,
        ]
    )
    _run_protoc(
        [*include_args(), "--include_imports", f"--descriptor_set_out={out_dir / DESCRIPTOR_SET_NAME}", *files]
    )
    # Regular packages, so setuptools finds and installs the generated modules.
    for package_dir in {p.parent for p in out_dir.rglob("*.py")}:
        current = package_dir
        while current != out_dir:
            (current / "__init__.py").touch()
            current = current.parent
    (out_dir / "lmcluster" / "py.typed").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "gen")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
