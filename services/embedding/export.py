"""`python -m services.embedding.export`: writes the ONNX exports the Embedding service loads.

Set-up runs it once so that the service starts without exporting. It exports the configured model
(LMC_EMBEDDING_MODEL_PATH, default the installed all-MiniLM-L6-v2) into LMC_EMBEDDING_ONNX_CACHE_DIR,
float32 and int8, and prints the folder. Running it again finds the export and does nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from services.common.binaries import PartMissingError
from services.common.logging import configure_logging
from services.embedding.encoder import ModelLoadError, export_onnx, resolve_model
from services.embedding.settings import EmbeddingSettings

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export the embedding model to ONNX (float32 and int8).")
    parser.add_argument(
        "--model-path", type=Path, help="a sentence-transformers folder (default: the setting)"
    )
    parser.add_argument(
        "--cache-dir", type=Path, help="where exports live (default: LMC_EMBEDDING_ONNX_CACHE_DIR)"
    )
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 quantized variant")
    args = parser.parse_args(argv)

    overrides: dict[str, object] = {}
    if args.model_path is not None:
        overrides["model_path"] = args.model_path
    if args.cache_dir is not None:
        overrides["onnx_cache_dir"] = args.cache_dir
    settings = EmbeddingSettings(**overrides)  # type: ignore[arg-type]
    configure_logging("embedding-export", settings.log_level, settings.log_format)
    try:
        source = resolve_model(settings)
        folder = export_onnx(source, settings.onnx_cache_dir, int8=not args.no_int8)
    except (ModelLoadError, PartMissingError) as error:
        log.error("%s", error)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
