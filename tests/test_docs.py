"""The reference site builds with ``mkdocs build --strict``, and it documents every public name:
for each public module M and each name N in ``M.__all__``, the site's Sphinx inventory
(``objects.inv``) holds ``M.N`` as a primary entry, i.e. an object rendered under that name
(mkdocstrings also lists the other paths of a rendered object, at priority 2)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")

ROOT = Path(__file__).resolve().parents[1]

#: The public modules, each with its page ``docs/reference/<last component>.md``.
MODULES = [
    "lrp_explicit",
    "lrp_explicit.functional",
    "lrp_explicit.ops",
    "lrp_explicit.rules",
    "lrp_explicit.dispatch",
    "lrp_explicit.composites",
    "lrp_explicit.composites.adapters",
    "lrp_explicit.pipeline",
    "lrp_explicit.latent",
    "lrp_explicit.explain",
    "lrp_explicit.runs",
    "lrp_explicit.audit",
    "lrp_explicit.heatmaps",
    "lrp_explicit.testing",
    "lrp_explicit.evaluation",
    "lrp_explicit.errors",
    "lrp_explicit.tokens",
    "lrp_explicit.cli",
    "lrp_explicit.integrations.inseq",
]

#: Modules of an optional extra: the library they import, without which they are skipped.
OPTIONAL = {"lrp_explicit.integrations.inseq": "inseq"}


def read_inventory(path: Path, primary: bool = True) -> set[str]:
    """The object names of a Sphinx inventory (version 2: four header lines, then zlib-compressed
    lines ``name domain:role priority uri display name``); with ``primary``, only the names of
    priority 1."""
    data = path.read_bytes()
    assert data.startswith(b"# Sphinx inventory version 2")
    start = 0
    for _ in range(4):
        start = data.index(b"\n", start) + 1
    names = set()
    for line in zlib.decompress(data[start:]).decode("utf-8").splitlines():
        name, _role, priority, _rest = line.split(" ", 3)
        if not primary or priority == "1":
            names.add(name)
    return names


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, \
        f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def test_the_site_builds_strict(site):
    assert (site / "index.html").is_file()
    assert (site / "objects.inv").is_file()
    for page in ("quickstart", "models", "rules", "audit", "performance", "faithfulness",
                 "vision", "design", "devices", "architecture", "changelog"):
        assert (site / page / "index.html").is_file(), page


@pytest.mark.parametrize("module", MODULES)
def test_every_public_module_has_a_reference_page(module):
    page = ROOT / "docs" / "reference" / f"{module.rsplit('.', 1)[-1]}.md"
    assert f"::: {module}\n" in page.read_text(encoding="utf-8")


@pytest.mark.parametrize("module", MODULES)
def test_every_name_in_all_is_documented(site, module):
    if module in OPTIONAL:
        pytest.importorskip(OPTIONAL[module], reason=f"{module} needs {OPTIONAL[module]}")
    names = importlib.import_module(module).__all__
    documented = read_inventory(site / "objects.inv")
    missing = sorted(name for name in names if f"{module}.{name}" not in documented)
    assert not missing, f"{module}: not in the site's inventory: {missing}"
