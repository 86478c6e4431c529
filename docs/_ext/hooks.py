"""MkDocs hooks of this site (loaded through ``hooks:`` in ``mkdocs.yml``).

* The benchmark scripts write their figures to ``benchmarks/results/``; the pages show them as
  ``results/<name>.png`` without a copy in ``docs/`` that could go stale.
* Snippets (``--8<-- "CHANGELOG.md"``) are found from the repository root whatever the working
  directory (``mkdocs build -f path/to/mkdocs.yml``).
"""
from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def on_config(config, **kwargs):
    snippets = config.mdx_configs.setdefault("pymdownx.snippets", {})
    snippets["base_path"] = [str(ROOT)]
    return config


def on_files(files: Files, config, **kwargs) -> Files:
    for image in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{image.name}", abs_src_path=str(image)))
    return files
