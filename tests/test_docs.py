"""Docs that run: every shell block the docs show (README.md and docs/*.md) is run here, so the docs cannot drift
from the code; and the docs site builds with `mkdocs build --strict`.

The rules the pages follow (docs/contributing.md says them to writers):
- A ```bash block is run as one bash script (`set -e`), in the order of its page, in a scratch folder of its
  own: each page starts from the quick start's state (data/shakespeare_char prepared, out/shakespeare_char_cpu
  trained for a few iterations), with `configs` and `scripts` linked in, and every block sees what the earlier
  blocks of its page left.
- `gptrain train` lines are cut to a few iterations (TRAIN_CUT is appended: later keys win), so a page can show
  the real recipe and still be checked in seconds.
- A block that must not run here (a GPU, torchrun on several nodes, a download, hours of training, an interactive
  session) is preceded by a line `<!-- not run: why -->`, which MkDocs does not show.
- Output and other text go in ```text blocks, which are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

DOCS = ROOT / "docs"
TRAIN_CUT = " --max_iters=4 --eval_interval=4 --eval_iters=2 --log_interval=2 --compile=false"
BLOCK = re.compile(r"(?P<marker><!-- not run: [^>]*-->\s*\n)?```bash\n(?P<code>.*?)```", re.S)
CUT_LINES = re.compile(r"^(\s*(?:gptrain|python -m gptrain|\S*/gptrain) train\b[^\n#]*?)(\s*(?:#.*)?)$", re.M)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def runnable_blocks(page: Path) -> list[str]:
    return [m["code"] for m in BLOCK.finditer(page.read_text(encoding="utf-8")) if not m["marker"]]


def cut_training(code: str) -> str:
    """Every `gptrain train ...` line, shortened to a few iterations (a line continued with \\ is cut at its end)."""
    joined = code.replace("\\\n", " ")
    return CUT_LINES.sub(lambda m: m[1] + TRAIN_CUT + m[2], joined)


@pytest.fixture(scope="session")
def quick_start(tmp_path_factory) -> Path:
    """The state every page starts from: Tiny Shakespeare prepared and the CPU recipe trained a few iterations."""
    folder = tmp_path_factory.mktemp("quick_start")
    run_block(f"gptrain prepare shakespeare\ngptrain train shakespeare_char_cpu{TRAIN_CUT}\n", folder)
    return folder


def run_block(code: str, folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(["bash", "-e", "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"in {folder}:\n{code}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n" \
                                   f"{result.stderr[-3000:]}"
    return result


def test_the_block_rules_see_what_they_should(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\ngptrain train x --a=1  # note\n```\n<!-- not run: a GPU -->\n```bash\ntorchrun x\n```\n"
                    "```text\nnot a command\n```\n```bash\ngptrain sample \\\n  --ckpt out\n```\n")
    blocks = runnable_blocks(page)
    assert blocks == ["gptrain train x --a=1  # note\n", "gptrain sample \\\n  --ckpt out\n"]
    assert cut_training(blocks[0]) == f"gptrain train x --a=1{TRAIN_CUT}  # note\n"
    assert cut_training(blocks[1]) == "gptrain sample    --ckpt out\n"


@pytest.mark.slow
@pytest.mark.parametrize("page", [p.name for p in pages()])
def test_every_block_of_the_docs_runs(page, quick_start, tmp_path):
    path = ROOT / page if page == "README.md" else DOCS / page
    folder = tmp_path / "work"
    shutil.copytree(quick_start, folder, symlinks=True)
    for name in ("configs", "scripts"):
        (folder / name).symlink_to(ROOT / name)
    for code in runnable_blocks(path):
        run_block(cut_training(code), folder)


@pytest.mark.slow
def test_the_docs_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
