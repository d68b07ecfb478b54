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

A block's `gptrain` is the console script's entry run in a child forked from one process that imported torch and
gptrain once (tests/warm_start.py), with the block's arguments, folder, environment and streams: the same code
and exit codes, without ~3 s of imports for each of the docs' 70 commands. `python -m gptrain` and the scripts
start fresh interpreters; tests/test_wheel.py runs the installed console script itself.
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
from warm_start import client_script

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


def block_env(gptrain_bin: Path) -> dict[str, str]:
    """What a block runs with: `gptrain` from gptrain_bin, the rest from the test's environment, offline."""
    path = os.pathsep.join([str(gptrain_bin), str(Path(sys.executable).parent), os.environ["PATH"]])
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="session")
def warm_gptrain(tmp_path_factory):
    """A folder whose `gptrain` runs each command in a child of one warm process (tests/warm_start.py)."""
    folder = tmp_path_factory.mktemp("warm")
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "warm_start.py"), str(folder / "socket")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=block_env(Path(sys.executable).parent))
    try:
        assert server.stdout.readline() == "ready\n", "the warm start did not start"
        (folder / "bin").mkdir()
        (folder / "bin" / "gptrain").write_text(client_script(str(folder / "socket")))
        (folder / "bin" / "gptrain").chmod(0o755)
        yield folder / "bin"
    finally:
        server.stdin.close()  # the server's signal to stop
        server.wait(timeout=60)


@pytest.fixture(scope="session")
def quick_start(tmp_path_factory, warm_gptrain) -> Path:
    """The state every page starts from: Tiny Shakespeare prepared and the CPU recipe trained a few iterations."""
    folder = tmp_path_factory.mktemp("quick_start")
    run_block(f"gptrain prepare shakespeare\ngptrain train shakespeare_char_cpu{TRAIN_CUT}\n", folder, warm_gptrain)
    return folder


def run_block(code: str, folder: Path, gptrain_bin: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-e", "-c", code], cwd=folder, env=block_env(gptrain_bin),
                            capture_output=True, text=True, timeout=600)
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


def test_the_warm_gptrain_does_what_the_console_script_does(warm_gptrain, tmp_path):
    """Output, error lines, exit codes, the working folder, stdin and a pipe, against the installed console script
    run fresh."""
    (tmp_path / "prompt.txt").write_text("ROMEO:")
    code = ("gptrain --version; echo $?\n"
            "gptrain sample --ckpt no_such_run; echo $?\n"
            "gptrain prepare text prompt.txt --out prepared --tokenizer char && cat prepared/meta.json | head -c 40\n"
            "gptrain train no_such_config < /dev/null; echo $?\n"
            "gptrain configs | sed -n 1,3p\n")  # sed reads it all: head's early exit would race the writer
    fresh = subprocess.run(["bash", "-c", code], cwd=tmp_path, env=block_env(Path(sys.executable).parent),
                           capture_output=True, text=True, timeout=300)
    shutil.rmtree(tmp_path / "prepared")
    warm = subprocess.run(["bash", "-c", code], cwd=tmp_path, env=block_env(warm_gptrain), capture_output=True,
                          text=True, timeout=300)
    assert fresh.stdout.count("\n") >= 8 and "error: " in fresh.stderr
    assert (warm.stdout, warm.stderr, warm.returncode) == (fresh.stdout, fresh.stderr, fresh.returncode)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p.name for p in pages()])
def test_every_block_of_the_docs_runs(page, quick_start, warm_gptrain, tmp_path):
    path = ROOT / page if page == "README.md" else DOCS / page
    folder = tmp_path / "work"
    shutil.copytree(quick_start, folder, symlinks=True)
    for name in ("configs", "scripts"):
        (folder / name).symlink_to(ROOT / name)
    for code in runnable_blocks(path):
        run_block(cut_training(code), folder, warm_gptrain)


@pytest.mark.slow
def test_the_docs_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
