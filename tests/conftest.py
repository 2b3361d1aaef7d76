"""Shared test set-up: one torch thread setting for the whole run, the model-side helpers every test file uses (a
tiny config, valid random labels from each task's `CTALTask.random_label`, batch-norm calibration), the test tiers
(`slow`, `multiprocess`), an offline, throw-away Hugging Face environment for every test, the real sample data
(skipped when absent), and a local Hub mirror (olah) for download tests.

Helpers are imported by the test files (`from conftest import tiny_config, random_labels`); fixtures arrive by
name."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from ctal_hf import CTALConfig, CTALForDenseMultitask

# One thread setting for the whole run (no test file sets its own): one intra-op thread per process keeps the
# `pytest -n 2` workers of `make test` on one core each and makes runs bit-reproducible. CTAL_TEST_THREADS overrides
# it (e.g. a serial run on a many-core machine).
torch.set_num_threads(int(os.environ.get("CTAL_TEST_THREADS", "1")))

REPO_ROOT = Path(__file__).resolve().parents[1]
REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
# train.py arguments of a small synthetic run (32x64, 8 training images) for the training tests.
SMALL = [
    "--image_size", "32", "64",
    "--num_train_images", "8",
    "--num_validation_images", "3",
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "3",
    "--num_prediction_images", "0",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------ model helpers
def tiny_config(**kwargs) -> CTALConfig:
    """A small CTAL-SS config: semseg, depth and normals at 64 x 64, 5 classes, the default HRNet-W18-small-v2
    backbone. Any field can be overridden."""
    fields = dict(tasks=["semseg", "depth", "normals"], image_size=[64, 64], num_semseg_classes=5)
    fields.update(kwargs)
    return CTALConfig(**fields)


def random_labels(config: CTALConfig, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Valid random labels at the config's image size for every task (built-in or custom), from each task's
    `CTALTask.random_label`, and checked by the task itself."""
    generator = torch.Generator().manual_seed(seed)
    height, width = config.image_size
    labels = {name: task.random_label(batch, height, width, generator) for name, task in config.get_tasks().items()}
    for name, task in config.get_tasks().items():
        task.check_label(labels[name], batch, (height, width))
    return labels


def calibrate_batch_norm(model: CTALForDenseMultitask, batch: int = 2, seed: int = 0) -> CTALForDenseMultitask:
    """Eval-mode model whose batch-norm statistics come from one random batch: with the initial statistics (mean 0,
    variance 1) a random HRNet's activations grow to ~1e4 or inf and its outputs mean nothing. (A model that already
    ran in training mode averages the new batch into its statistics.)"""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average: on a new model, one batch sets the statistics exactly
    model.train()
    with torch.no_grad():
        model(torch.randn(batch, 3, *model.config.image_size, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


# ------------------------------------------------------------------------------------------------ Hugging Face
def _patch_hf_modules(monkeypatch, *, offline: bool, home: Path | None = None, endpoint: str | None = None):
    """Patch the module-level constants that huggingface_hub / datasets read once at import time."""
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", offline)
        if home is not None:
            monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
            monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
            monkeypatch.setattr(hub_constants, "HUGGINGFACE_HUB_CACHE", str(home / "hub"))
            monkeypatch.setattr(hub_constants, "HF_ASSETS_CACHE", str(home / "assets"))
            monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(home / "token"))
            monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        if endpoint is not None:
            monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
            monkeypatch.setattr(
                hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
            )
    ds_config = sys.modules.get("datasets.config")
    if ds_config is not None:
        monkeypatch.setattr(ds_config, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(ds_config, "HF_DATASETS_OFFLINE", offline)
        if home is not None:
            monkeypatch.setattr(ds_config, "HF_CACHE_HOME", str(home))
            monkeypatch.setattr(ds_config, "HF_DATASETS_CACHE", home / "datasets")
            monkeypatch.setattr(ds_config, "HF_MODULES_CACHE", home / "modules")
            monkeypatch.setattr(ds_config, "DOWNLOADED_DATASETS_PATH", home / "datasets" / "downloads")
            monkeypatch.setattr(ds_config, "EXTRACTED_DATASETS_PATH", home / "datasets" / "downloads" / "extracted")
        if endpoint is not None:
            monkeypatch.setattr(ds_config, "HF_ENDPOINT", endpoint)
            monkeypatch.setattr(
                ds_config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
            )
    if endpoint is not None:
        # fsspec caches HfFileSystem instances (keyed on arguments): drop them so the new endpoint is used.
        hf_file_system = sys.modules.get("huggingface_hub.hf_file_system")
        if hf_file_system is not None:
            hf_file_system.HfFileSystem.clear_instance_cache()
        # `huggingface_hub.list_repo_files` & co. are methods of a module-level HfApi built at import time.
        hf_api = sys.modules.get("huggingface_hub.hf_api")
        if hf_api is not None and hasattr(hf_api, "api"):
            monkeypatch.setattr(hf_api.api, "endpoint", endpoint)


@pytest.fixture(autouse=True)
def hf_offline_env(monkeypatch, tmp_path_factory):
    """Every test runs offline with a temporary HF_HOME, so nothing reads or writes the user's cache."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(home / "modules"))
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    _patch_hf_modules(monkeypatch, offline=True, home=home)
    yield home


@pytest.fixture
def realdata() -> Path:
    """The shared real sample folder (`../shared/realdata`); the test is skipped when it is absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"real sample data not found at {REALDATA}")
    return REALDATA


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _find_olah() -> str | None:
    candidate = Path(sys.executable).parent / "olah-cli"
    if candidate.exists():
        return str(candidate)
    return shutil.which("olah-cli")


class HubMirror:
    """A running olah server serving plain git repos from `mirrors` as a read-only Hugging Face Hub."""

    def __init__(self, endpoint: str, mirrors: Path):
        self.endpoint = endpoint
        self.mirrors = mirrors

    def add_repo(self, repo_type: str, repo_id: str, folder: Path) -> Path:
        """Copy `folder` to `<mirrors>/<repo_type>s/<org>/<name>` as a git repo with one commit; return that path.

        A dataset repo needs a README.md (olah and the Hub read its card)."""
        if repo_type not in ("model", "dataset"):
            raise ValueError(f"repo_type must be 'model' or 'dataset', got {repo_type!r}")
        if repo_id.count("/") != 1:
            raise ValueError(f"repo_id must be 'org/name', got {repo_id!r}")
        target = self.mirrors / f"{repo_type}s" / repo_id
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(folder, target)
        env = {
            **os.environ,
            "GIT_AUTHOR_NAME": "test",
            "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test",
            "GIT_COMMITTER_EMAIL": "test@example.com",
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": str(self.mirrors),
        }
        for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "add files"]):
            subprocess.run(["git", *args], cwd=target, env=env, check=True, capture_output=True)
        return target

    def use(self, monkeypatch) -> str:
        """Point huggingface_hub / datasets / transformers at this mirror (online) for the current test."""
        monkeypatch.setenv("HF_ENDPOINT", self.endpoint)
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.setenv(name, "0")
        _patch_hf_modules(monkeypatch, offline=False, endpoint=self.endpoint)
        return self.endpoint


@pytest.fixture(scope="session")
def hub_mirror(tmp_path_factory):
    """Start `olah-cli` on a free 127.0.0.1 port, serving git repos added with `.add_repo(...)`.

    Tests call `hub_mirror.use(monkeypatch)` (or set HF_ENDPOINT and patch `huggingface_hub.constants.ENDPOINT`
    themselves) to download from it."""
    olah = _find_olah()
    if olah is None:
        pytest.skip("olah-cli (pip install olah) is not installed: no local Hub mirror for download tests")
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the local Hub mirror serves git repos")
    root = tmp_path_factory.mktemp("olah")
    mirrors = root / "mirrors"
    for sub in ("models", "datasets", "spaces"):
        (mirrors / sub).mkdir(parents=True)
    port = _free_port()
    config = root / "olah.toml"
    config.write_text(
        "[basic]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f'repos-path = "{root / "repos"}"\n'
        f'mirrors-path = ["{mirrors}"]\n'
        'mirror-scheme = "http"\n'
        f'mirror-netloc = "127.0.0.1:{port}"\n'
        f'mirror-lfs-netloc = "127.0.0.1:{port}"\n'
        "\n[accessibility]\n"
        "offline = true\n"
    )
    log = open(root / "olah.log", "wb")  # noqa: SIM115 - closed at teardown
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    proc = subprocess.Popen([olah, "-c", str(config)], cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                log.flush()
                pytest.skip(f"olah-cli exited with code {proc.returncode}: {(root / 'olah.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(endpoint + "/api/models/none/none", timeout=2):
                    pass
                break
            except urllib.error.HTTPError:
                break  # the server answers (a 404 for the unknown repo is fine)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    pytest.skip(f"olah-cli did not answer on {endpoint} within 60 s")
                time.sleep(0.2)
        yield HubMirror(endpoint, mirrors)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


__all__ = ["REALDATA", "REPO_ROOT", "HubMirror", "calibrate_batch_norm", "random_labels", "tiny_config"]
