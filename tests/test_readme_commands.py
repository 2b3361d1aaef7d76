"""Every command in the bash blocks of the README and the docs/ pages against the installed tools: the program (and
`hf` subcommand) exists and every `--flag` passed appears in that program's `--help`. `huggingface-cli` (removed in huggingface_hub
1.0) appears nowhere in the repository."""

import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Programs the README runs, by the words that start a command -> the `--help` command line (run from the repo).
PROGRAMS: dict[tuple[str, ...], list[str]] = {
    ("python", "examples/train.py"): [sys.executable, "examples/train.py", "--help"],
    ("python", "examples/run_experiments.py"): [sys.executable, "examples/run_experiments.py", "--help"],
    ("python", "examples/make_table.py"): [sys.executable, "examples/make_table.py", "--help"],
    ("python", "examples/fetch_mobilenet_v2_weights.py"): [
        sys.executable,
        "examples/fetch_mobilenet_v2_weights.py",
        "--help",
    ],
    ("python", "-m", "dataset_scripts.publish"): [sys.executable, "-m", "dataset_scripts.publish", "--help"],
    ("ctal-predict",): [str(BIN / "ctal-predict"), "--help"],
    ("ctal-export",): [str(BIN / "ctal-export"), "--help"],
    # The entry points of this checkout, whether or not the environment has them installed:
    ("ctal-demo",): [sys.executable, "-m", "ctal_hf.demo", "--help"],
    ("ctal-predict-bulk",): [sys.executable, "-m", "ctal_hf.bulk", "--help"],
    ("python", "-m", "ctal_hf.bulk"): [sys.executable, "-m", "ctal_hf.bulk", "--help"],
    ("python", "-m", "ctal_hf.demo"): [sys.executable, "-m", "ctal_hf.demo", "--help"],
    ("hf", "auth", "login"): [str(BIN / "hf"), "auth", "login", "--help"],
    ("hf", "upload"): [str(BIN / "hf"), "upload", "--help"],
    ("accelerate", "launch"): [str(BIN / "accelerate"), "launch", "--help"],
    ("torchrun",): [str(BIN / "torchrun"), "--help"],
}
# Programs that start another (a script or `-m module` after their own options), and programs that pass what follows
# `--` on to another.
LAUNCHERS: tuple[tuple[str, ...], ...] = (("accelerate", "launch"), ("torchrun",))
FORWARDS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("python", "examples/run_experiments.py"): ("python", "examples/train.py")
}
# Make targets, shell commands, inline Python, installs, an interactive wizard, CI and test runners.
SKIPPED = (
    "make",
    "echo",
    "mkdir",
    "cd ",
    "unzip",
    "python -c",
    "pip",
    "apt-get",
    "accelerate config",
    ".ci/run",
    "pytest",
)


def readme_commands() -> list[str]:
    text = "\n".join(path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()  # trailing comments (no README command quotes a '#')
            line = re.sub(r"^(\w+=\S+\s+)+", "", line)  # environment assignments
            if line and not line.startswith("#") and not line.startswith(SKIPPED):
                commands.append(line)
    return commands


def split(command: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """A command -> (program, its arguments) pairs: `accelerate launch ... script.py ...` (or `-m module`) gives two,
    and so does a program that forwards what follows `--` (`FORWARDS`)."""
    words = [w.strip("[]") for w in shlex.split(command) if w != "..."]
    parts = []
    while words:
        program = next((p for p in sorted(PROGRAMS, key=len, reverse=True) if tuple(words[: len(p)]) == p), None)
        if program is None:
            raise AssertionError(f"command {command!r} runs {words[0]!r}, which this test does not know")
        rest = words[len(program) :]
        script = next((i for i, w in enumerate(rest) if w.endswith(".py") or w == "-m"), None)
        if program in LAUNCHERS and script is not None:
            parts.append((program, rest[:script]))
            words = ["python", *rest[script:]]
        elif program in FORWARDS and "--" in rest:
            parts.append((program, rest[: rest.index("--")]))
            words = [*FORWARDS[program], *rest[rest.index("--") + 1 :]]
        else:
            parts.append((program, rest))
            words = []
    return parts


@cache
def help_text(program: tuple[str, ...]) -> str:
    command = PROGRAMS[program]
    if not Path(command[0]).exists() and shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(program)} --help failed: {result.stderr[-2000:]}"
    return result.stdout + result.stderr


def _project_files() -> list[Path]:
    """The repository's own files: git's list where the tree is a checkout (never `.venv`, outputs or other ignored
    folders), else every file outside hidden folders."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout:
        return [REPO / name for name in listed.stdout.split("\0") if name]
    return [path for path in REPO.rglob("*") if not any(part.startswith(".") for part in path.relative_to(REPO).parts)]


def test_no_huggingface_cli_anywhere():
    offenders = [
        str(path.relative_to(REPO))
        for path in _project_files()
        if path.is_file()
        and path.suffix in (".py", ".md", ".sh", ".toml", ".txt", ".yml", ".yaml")
        and path.name not in (Path(__file__).name, "hub-ecosystem.md")  # the page that says it was removed
        and "huggingface-cli" in path.read_text(errors="ignore")
    ]
    assert not offenders, f"huggingface-cli (removed in huggingface_hub 1.0; use `hf`) in {offenders}"


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_commands())
def test_documented_command_flags_exist(command):
    for program, arguments in split(command):
        text = help_text(program)
        flags = {word.split("=")[0] for word in arguments if word.startswith("--")}
        missing = sorted(flag for flag in flags if not re.search(re.escape(flag) + r"\b", text))
        assert not missing, f"{' '.join(program)} (installed) has no {missing}: README command {command!r}"
