"""Registry scan benchmark: 1,000 GGUF files, the first full scan, a rescan, and a raw-I/O baseline.

The folder holds 950 small real GGUFs written with gguf.GGUFWriter (20 shapes, 50 publishers) and
50 copies of the demo model's real header (1.8 MB: 49k-token vocabulary, 272 tensors) followed by
a sparse hole up to the model's full size, so they validate like the real file without using disk.

Measured, in one run, on a warm page cache:
- baseline: walk the folder, stat every file and read its first MiB (what the header hash reads);
- validation alone: `check_model_file` on every file, one thread;
- first full scan: `ModelCatalog.start()` (walk, validate on the scan threads, build the model table);
- rescan of the unchanged folder (one stat per file, nothing re-validated).

Run: `.venv/bin/python -m pytest tests/bench/bench_registry_scan.py -s` (part of `make bench`)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

from services.common import binaries
from services.registry.catalog import ModelCatalog
from services.registry.discovery import scan_models_dir
from services.registry.gguf_validation import check_model_file, read_gguf_header
from services.registry.settings import RegistrySettings
from tests.registry.gguf_files import header_copy, write_small_gguf

FILES = 1000
REAL_HEADERS = 50
SHAPES = 20


def build_folder(root: Path, demo_model: Path) -> None:
    templates = root / ".templates"  # hidden: the Registry skips it
    shapes = [
        write_small_gguf(templates / f"shape{n}.gguf", embedding_length=64 * (1 + n % 4), rows=32 * (1 + n))
        for n in range(SHAPES)
    ]
    data_offset = read_gguf_header(demo_model).data_offset
    old = time.time() - 3600
    for n in range(FILES):
        publisher, repo = f"publisher{n % 50:02d}", f"Model{n // 50:02d}-GGUF"
        if n % (FILES // REAL_HEADERS) == 0:
            path = header_copy(demo_model, root / publisher / repo / f"Model{n:04d}.Q4_1.gguf", data_offset)
        else:
            path = root / publisher / repo / f"Model{n:04d}-F16.gguf"
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shapes[n % SHAPES], path)
        os.utime(path, (old, old))


def baseline_seconds(root: Path) -> float:
    started = time.perf_counter()
    for path in scan_models_dir(root, 8):
        with path.open("rb") as handle:
            handle.read(1024 * 1024)
    return time.perf_counter() - started


def validation_seconds(root: Path) -> tuple[float, int]:
    paths = list(scan_models_dir(root, 8))
    started = time.perf_counter()
    valid = sum(1 for path in paths if check_model_file(path).ok)
    return time.perf_counter() - started, valid


async def catalog_seconds(root: Path) -> tuple[float, float, int]:
    settings = RegistrySettings(models_dir=root, port=0, metrics_port=0, settle_seconds=0, watch=False)  # type: ignore[call-arg]
    catalog = ModelCatalog(settings)
    started = time.perf_counter()
    await catalog.start()
    first = time.perf_counter() - started
    try:
        started = time.perf_counter()
        await catalog.refresh()
        rescan = time.perf_counter() - started
        ready = sum(1 for model in catalog.models() if model.state == 2)
    finally:
        await catalog.close()
    return first, rescan, ready


def run_benchmark(root: Path) -> dict[str, float]:
    demo_model = binaries.demo_model_path()
    started = time.perf_counter()
    build_folder(root, demo_model)
    built = time.perf_counter() - started
    count = len(scan_models_dir(root, 8))
    assert count == FILES, count
    baseline_seconds(root)  # warm the page cache the same way for every measurement
    base = baseline_seconds(root)
    validate, valid = validation_seconds(root)
    first, rescan, ready = asyncio.run(catalog_seconds(root))
    assert valid == ready == FILES, (valid, ready)
    results = {
        "files": FILES,
        "baseline_files_per_s": FILES / base,
        "validation_files_per_s": FILES / validate,
        "first_scan_files_per_s": FILES / first,
        "rescan_files_per_s": FILES / rescan,
    }
    print(
        f"\nRegistry scan benchmark: {FILES} files ({REAL_HEADERS} real 1.8 MB headers), "
        f"built in {built:.1f} s"
    )
    rows = [
        ("baseline (walk + stat + read first MiB)", base),
        ("validation alone (one thread)", validate),
        ("first full scan (ModelCatalog.start)", first),
        ("rescan, nothing changed", rescan),
    ]
    for label, seconds in rows:
        print(f"  {label:<40} {seconds:7.3f} s  {FILES / seconds:9.0f} files/s")
    print(f"  first scan / baseline time: {first / base:.1f}x;  rescan / baseline time: {rescan / base:.2f}x")
    return results


def test_registry_scan_benchmark(tmp_path: Path) -> None:
    results = run_benchmark(tmp_path / "models")
    assert results["first_scan_files_per_s"] > 0

