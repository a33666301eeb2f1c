"""The README and docs/ as a newcomer meets them: short, every link leads somewhere, the layout names
every module, and the offline quick start works when typed in as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

README = REPO / "README.md"
PAGES = [README, REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
QUICK_START_MARKER = "<!-- quick-start:"
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", markdown), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(FENCE.sub("", page.read_text()))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not ours to check


def test_the_readme_fits_on_a_screen():
    assert README.stat().st_size < 10_000, f"README.md is {README.stat().st_size} bytes; move reference text to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no {dest})")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text())):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


def test_the_link_checker_sees_a_broken_anchor(tmp_path: Path):
    page = tmp_path / "a.md"
    page.write_text("# Collect images\n\n## Twice\n\n## Twice\n\n[x](#collect-images) [y](#twice-1) [z](#nope)\n")
    assert relative_links(page) == ["#collect-images", "#twice-1", "#nope"]
    assert {"collect-images", "twice", "twice-1"} <= anchors(page.read_text())
    assert "nope" not in anchors(page.read_text())


def test_the_layout_names_every_module():
    """The README's layout block names every module of jobs/, handler/ and scripts/ (it once missed seven)."""
    layout = README.read_text().split("## Layout", 1)[1]
    names = {p.name for d in ("jobs", "handler", "scripts") for p in (REPO / d).iterdir()
             if (p.suffix in {".py", ".sh", ".properties", ".yaml"} or (p / "__init__.py").is_file())
             and p.name not in {"__init__.py", "__main__.py"}}
    missing = sorted(n for n in names if (n.removesuffix(".py") if n.endswith(".py") else n) not in layout)
    assert not missing, f"README's layout does not mention {missing}"


def quick_start_script(readme: str) -> str:
    """The fenced block after the quick-start marker, as written."""
    after = readme.split(QUICK_START_MARKER, 1)[1]
    block = re.search(r"^```bash\n(.*?)^```", after, re.S | re.M)
    assert block, "no ```bash block after the quick-start marker"
    return block.group(1)


def json_documents(text: str) -> list:
    """The JSON objects that start a line of ``text`` (TorchServe indents its answers over several lines)."""
    found = []
    for start in re.finditer(r"^\{", text, re.M):
        try:
            found.append(json.JSONDecoder().raw_decode(text, start.start())[0])
        except ValueError:
            continue
    return found


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("java") is None or shutil.which("curl") is None,
                    reason="the quick start serves with TorchServe (Java 17) and asks with curl")
def test_the_offline_quick_start_works_as_written(tmp_path: Path):
    """The README's quick-start block, run line by line in a fresh copy of the repository with a fresh
    TORCH_HOME and Hugging Face cache and every download going to a closed port: it trains, serves,
    answers the curl with predictions (bees first for the bee photo), and stops the server."""
    if any(_port_busy(p) for p in (8080, 8081, 8082)):
        pytest.skip("the quick start serves on TorchServe's default ports 8080-8082, and one is in use")
    repo = tmp_path / "repo"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, repo / rel)
    (repo / ".venv").symlink_to(Path(sys.prefix))  # what `bash scripts/setup.sh` made
    script = quick_start_script(README.read_text())
    (tmp_path / "quick_start.sh").write_text("set -euo pipefail\n" + script)
    closed = f"http://127.0.0.1:{_unused_port()}"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "PYTHONPATH"}
    env.update({"TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
                "http_proxy": closed, "https_proxy": closed, "HTTP_PROXY": closed, "HTTPS_PROXY": closed,
                "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost", "OMP_NUM_THREADS": "2"})
    try:
        done = subprocess.run(["bash", str(tmp_path / "quick_start.sh")], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=1200)
    finally:  # the server must not outlive a failed run
        subprocess.run([sys.executable, "-m", "jobs", "serve", "--model-store", "runs/bees/model-store", "--stop"],
                       cwd=repo, env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, f"quick start exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    answer = next(answer for answer in json_documents(done.stdout) if "predictions" in answer)
    predictions = answer["predictions"]
    assert {p["label"] for p in predictions} == {"ants", "bees"}
    assert predictions[0]["label"] == "bees", predictions
    assert answer["abstain"] is False and answer["ood_score"] >= 0  # a bee photo is like the training images
    assert "serve: stopped the TorchServe serving runs/bees/model-store" in done.stdout
    # The hints it printed name the interpreter the user typed, relative to where they stand.
    assert ".venv/bin/python -m jobs serve --model-store runs/bees/model-store" in done.stdout
