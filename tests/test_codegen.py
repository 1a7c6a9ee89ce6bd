"""gen/ is exactly what protos/ generate, and its descriptor set carries PRODUCT.md's API."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2

from services import codegen

GEN_DIR = codegen.REPO_ROOT / "gen"

# PRODUCT.md: the five services and the methods each must have; server-streaming ones marked.
REQUIRED_METHODS: dict[str, dict[str, bool]] = {
    "lmcluster.registry.v1.RegistryService": {"ListModels": False, "GetModel": False, "WatchModels": True},
    "lmcluster.supervisor.v1.SupervisorService": {
        "ListBackends": False,
        "EnsureBackend": False,
        "StopBackend": False,
        "WatchBackends": True,
    },
    "lmcluster.embedding.v1.EmbeddingService": {"Embed": False},
    "lmcluster.cache.v1.CacheService": {
        "Lookup": False,
        "Store": False,
        "Invalidate": False,
        "GetStats": False,
    },
    "lmcluster.router.v1.RouterService": {
        "CreateChatCompletion": False,
        "StreamChatCompletion": True,
        "CreateCompletion": False,
        "StreamCompletion": True,
        "CreateEmbedding": False,
        "ListModels": False,
    },
}


def _tree(root: Path) -> dict[str, bytes]:
    """Every generated file under root by relative path (Python's bytecode caches left out)."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_gen_is_in_sync_with_protos(tmp_path: Path) -> None:
    fresh_dir = tmp_path / "gen"
    codegen.generate(fresh_dir)
    fresh, committed = _tree(fresh_dir), _tree(GEN_DIR)

    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    differing = sorted(name for name in fresh.keys() & committed.keys() if fresh[name] != committed[name])
    assert not (missing or extra or differing), (
        "gen/ is out of date; run `make gen` and commit the result.\n"
        f"  not in gen/: {missing}\n  only in gen/: {extra}\n  different: {differing}"
    )


def test_descriptor_set_has_every_service_and_method() -> None:
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(
        (GEN_DIR / codegen.DESCRIPTOR_SET_NAME).read_bytes()
    )
    services = {
        f"{file.package}.{service.name}": service for file in descriptor_set.file for service in file.service
    }
    for service_name, methods in REQUIRED_METHODS.items():
        assert service_name in services, f"{service_name} not in the descriptor set; found {sorted(services)}"
        found = {method.name: method.server_streaming for method in services[service_name].method}
        for method, streaming in methods.items():
            assert method in found, f"{service_name} has no {method}; it has {sorted(found)}"
            assert found[method] == streaming, (
                f"{service_name}.{method}: server_streaming should be {streaming}"
            )
