"""Every command in the README's bash blocks against the installed tools: the program (and `hf` subcommand) exists and
every `--flag` the README passes appears in that program's `--help`. `huggingface-cli` (removed in huggingface_hub
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
    ("python", "-m", "dataset_scripts.publish"): [sys.executable, "-m", "dataset_scripts.publish", "--help"],
    ("ctal-predict",): [str(BIN / "ctal-predict"), "--help"],
    ("ctal-export",): [str(BIN / "ctal-export"), "--help"],
    ("hf", "auth", "login"): [str(BIN / "hf"), "auth", "login", "--help"],
    ("hf", "upload"): [str(BIN / "hf"), "upload", "--help"],
    ("accelerate", "launch"): [str(BIN / "accelerate"), "launch", "--help"],
    ("torchrun",): [str(BIN / "torchrun"), "--help"],
}
SKIPPED = ("make", "echo", "pip", "accelerate config")  # make targets, shell, installs, an interactive wizard


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()  # trailing comments (no README command quotes a '#')
            line = re.sub(r"^(\w+=\S+\s+)+", "", line)  # environment assignments
            if line and not line.startswith("#") and not line.startswith(SKIPPED):
                commands.append(line)
    return commands


def split(command: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """A command -> (program, its arguments) pairs: `accelerate launch ... script.py ...` gives two."""
    words = [w for w in shlex.split(command) if w != "..."]
    words = [w.strip("[]") for w in words]
    parts = []
    while words:
        program = next((p for p in sorted(PROGRAMS, key=len, reverse=True) if tuple(words[: len(p)]) == p), None)
        if program is None:
            raise AssertionError(f"README command {command!r} runs {words[0]!r}, which this test does not know")
        rest = words[len(program) :]
        script = next((i for i, w in enumerate(rest) if w.endswith(".py")), None)
        if program in (("accelerate", "launch"), ("torchrun",)) and script is not None:
            parts.append((program, rest[:script]))
            words = ["python", *rest[script:]]
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


def test_no_huggingface_cli_anywhere():
    offenders = [
        str(path.relative_to(REPO))
        for path in REPO.rglob("*")
        if path.is_file()
        and path.suffix in (".py", ".md", ".sh", ".toml", ".txt", ".yml", ".yaml")
        and ".git" not in path.parts
        and path.name not in (Path(__file__).name, "hub-ecosystem.md")  # the page that says it was removed
        and "huggingface-cli" in path.read_text(errors="ignore")
    ]
    assert not offenders, f"huggingface-cli (removed in huggingface_hub 1.0; use `hf`) in {offenders}"


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_flags_exist(command):
    for program, arguments in split(command):
        text = help_text(program)
        flags = {word.split("=")[0] for word in arguments if word.startswith("--")}
        missing = sorted(flag for flag in flags if not re.search(re.escape(flag) + r"\b", text))
        assert not missing, f"{' '.join(program)} (installed) has no {missing}: README command {command!r}"
