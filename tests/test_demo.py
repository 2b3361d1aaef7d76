"""`ctal-demo` (ctal_hf.demo): the pictures and upload checks without gradio, `--help` without gradio, and the page
in a real browser (Debian's chromium driven by Playwright): a real photograph uploaded, every task's map shown, the
raw maps downloaded, bad uploads answered with a message, an example picked; a screenshot under the test's folder."""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor
from ctal_hf.demo.rendering import (
    RENDERERS,
    DemoInputError,
    DisplayInfo,
    check_upload,
    render_all,
    save_raw_maps,
)

REPO = Path(__file__).resolve().parents[1]
TASKS = ["semseg", "depth", "normals", "saliency", "edge", "parts"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_config() -> CTALConfig:
    labels = {0: "wall", 1: "floor", 2: "table", 3: "picture", 4: "window"}
    return CTALConfig(tasks=TASKS, image_size=[64, 64], num_semseg_classes=5, id2label=labels)


@pytest.fixture(scope="module")
def saved_model(tiny_config, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CTALForDenseMultitask(tiny_config)
    for module in model.modules():  # batch-norm statistics from one batch: outputs O(1), maps not saturated
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    folder = tmp_path_factory.mktemp("demo-model")
    model.eval().save_pretrained(folder)
    CTALImageProcessor.from_model_config(tiny_config).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------- pictures and input checks
def test_every_task_kind_has_a_picture_with_its_key(tiny_config):
    tasks = tiny_config.get_tasks()
    assert all(isinstance(task, tuple(RENDERERS)) for task in tasks.values())
    rng = np.random.default_rng(0)
    size = (30, 50)
    result = {
        "semseg": rng.integers(0, 5, size),
        "parts": rng.integers(0, 7, size),
        "depth": rng.uniform(0.5, 4.0, size).astype(np.float32),
        "normals": rng.normal(size=(*size, 3)).astype(np.float32),
        "saliency": rng.uniform(0, 1, size).astype(np.float32),
        "edge": rng.uniform(0, 1, size).astype(np.float32),
        "visualizations": {},
    }
    info = DisplayInfo.from_config(tiny_config, units={"depth": "m"})
    assert info.class_names["semseg"] == ["wall", "floor", "table", "picture", "window"]
    assert info.class_names["parts"] == [f"class {i}" for i in range(7)]  # id2label names semseg only
    assert info.units == {"depth": "m"}
    with pytest.raises(ValueError, match="not regression tasks"):
        DisplayInfo.from_config(tiny_config, units={"normals": "m"})
    pictures = render_all(result, tasks, info)
    assert sorted(pictures) == sorted(TASKS)
    for task, picture in pictures.items():
        array = np.asarray(picture)
        assert picture.mode == "RGB" and array.std() > 10, task  # not blank
    # The key takes room beside the map: legend (classes) and colour bars are wider than the map alone.
    assert pictures["semseg"].width > pictures["normals"].width * 1.3
    assert pictures["depth"].width > pictures["normals"].width * 1.2


def test_names_and_units_come_from_the_task_specs_else_placeholders():
    config = CTALConfig(tasks=["semseg", "depth"], image_size=[64, 64], num_semseg_classes=3)  # id2label LABEL_<i>
    info = DisplayInfo.from_config(config)
    assert info.class_names["semseg"] == ["class 0", "class 1", "class 2"]
    assert info.units["depth"] == "the unit of the model's training data"
    specs = {"semseg": {"class_names": ["sky", "road", "car"]}, "depth": {"unit": "disparity"}}
    config = CTALConfig(tasks=["semseg", "depth"], image_size=[64, 64], num_semseg_classes=3, task_specs=specs)
    info = DisplayInfo.from_config(config)
    assert info.class_names["semseg"] == ["sky", "road", "car"] and info.units["depth"] == "disparity"


def test_bad_uploads_are_one_sentence(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    big = tmp_path / "big.png"
    PIL.Image.new("L", (300, 200)).save(big)
    bomb = tmp_path / "bomb.png"
    PIL.Image.new("1", (20000, 20000)).save(bomb)  # 400 megapixels, a few kB on disk
    cases = [
        (None, "Upload an image"),
        (text, "notes.txt is not an image"),
        (big, "big.png is 300x200 (0.06 megapixels); this demo takes up to 0.05 megapixels"),
        (bomb, "bomb.png is far too large"),
    ]
    for path, message in cases:
        with pytest.raises(DemoInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_upload(path, max_pixels=50_000)
    assert check_upload(big, max_pixels=60_000).size == (300, 200)


def test_raw_maps_npz_round_trip(tmp_path):
    result = {"semseg": np.arange(6).reshape(2, 3), "depth": np.ones((2, 3), np.float32), "edge": np.zeros((2, 3))}
    path = save_raw_maps(result, ["semseg", "depth"], tmp_path, "room")
    assert path.name == "room_maps.npz" and [p.name for p in tmp_path.iterdir()] == ["room_maps.npz"]
    with np.load(path) as loaded:
        assert sorted(loaded.files) == ["depth", "semseg"]
        np.testing.assert_array_equal(loaded["semseg"], result["semseg"])
        assert loaded["depth"].dtype == np.float32


def test_page_callback_without_a_browser(saved_model, tmp_path):
    """The page's callback as the page calls it: statuses, pictures, the .npz; and the page builds."""
    gr = pytest.importorskip("gradio", reason="gradio not installed: pip install -e '.[demo]'")
    from transformers import pipeline

    from ctal_hf.demo.app import DemoPredictor, build_demo

    predictor = pipeline("dense-multitask", model=str(saved_model), device="cpu")
    assert isinstance(build_demo(predictor, examples=[]), gr.Blocks)
    callback = DemoPredictor(predictor, DisplayInfo.from_config(predictor.model.config), workdir=tmp_path / "work")
    photo = tmp_path / "photo.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(photo)
    status, preview, archive, *pictures = callback(str(photo), ["depth", "semseg"])
    assert status.startswith("Predicted 2 task(s) for a 120x90 image"), status
    assert preview.size == (120, 90)
    with np.load(archive) as maps:
        assert sorted(maps.files) == ["depth", "semseg"] and maps["depth"].shape == (90, 120)
    shown = {task: picture for task, picture in zip(TASKS, pictures, strict=True) if picture.visible}
    assert sorted(shown) == ["depth", "semseg"]
    text = tmp_path / "x.txt"
    text.write_text("no")
    for path, chosen, message in ((text, TASKS, "x.txt is not an image"), (photo, [], "Choose at least one task")):
        status, preview, archive, *pictures = callback(str(path), chosen)
        assert status.startswith("**Error:**") and message in status and preview is None and archive is None


# ---------------------------------------------------------------------------------------------------- command line
def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


HIDE_GRADIO = "import sys\nsys.modules['gradio'] = None  # as if not installed\nfrom ctal_hf.demo.cli import main\n"


def test_help_works_without_gradio():
    result = run_python(
        HIDE_GRADIO + "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\nassert not heavy, heavy\nprint('ok')"
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    assert "--model" in result.stdout and "--examples" in result.stdout


def test_launching_without_gradio_names_the_extra(saved_model):
    result = run_python(HIDE_GRADIO + f"main(['--model', {str(saved_model)!r}])")
    assert result.returncode == 1
    assert 'pip install "ctal-hf[demo]"' in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_bad_arguments_are_refused_at_once(tmp_path):
    result = run_python(HIDE_GRADIO + f"main(['--model', {str(tmp_path / 'nope')!r}])")
    assert result.returncode == 2 and "no such folder" in result.stderr, result.stderr


def test_space_app_reads_its_settings_from_the_environment(saved_model, tmp_path, monkeypatch):
    import importlib.util

    from ctal_hf.demo.cli import parse_args

    spec = importlib.util.spec_from_file_location("space_app", REPO / "app.py")
    space_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(space_app)  # defines the arguments; serves only when run as a script
    examples = tmp_path / "examples"
    examples.mkdir()
    PIL.Image.new("RGB", (8, 8)).save(examples / "b.png")
    PIL.Image.new("RGB", (8, 8)).save(examples / "a.jpg")
    (examples / "readme.txt").write_text("not an example")
    monkeypatch.setenv("CTAL_DEMO_MODEL", str(saved_model))
    monkeypatch.setenv("CTAL_DEMO_EXAMPLES", str(examples))
    monkeypatch.setenv("CTAL_DEMO_UNITS", "depth=m")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    args = parse_args(space_app.space_arguments())
    assert (args.model, args.host, args.port, args.units) == (str(saved_model), "0.0.0.0", 7861, {"depth": "m"})
    assert args.examples == [str(examples / "a.jpg"), str(examples / "b.png")]
    monkeypatch.delenv("CTAL_DEMO_MODEL")
    assert space_app.space_arguments()[:2] == ["--model", str(REPO / "model")]


# ---------------------------------------------------------------------------------------------------- the browser
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _browser_requirements() -> None:
    import importlib.util

    missing = [name for name in ("gradio", "playwright") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: pip install -e '.[demo-test]'")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no browser at {CHROMIUM}: apt-get install chromium (Debian's package)")


@pytest.fixture
def demo_server(saved_model, realdata, tmp_path):
    """`python -m ctal_hf.demo` on a free 127.0.0.1 port, with the real photograph as its example."""
    _browser_requirements()
    photo = realdata / "nyuv2-433" / "000433.png"
    example = tmp_path / "example" / "pascal.jpg"
    example.parent.mkdir()
    shutil.copy(sorted((realdata / "pascal-context").glob("*.jpg"))[0], example)
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "ctal_hf.demo", "--model", str(saved_model), "--port", str(port)]
    command += ["--examples", str(example), "--max_pixels", "2000000", "--units", "depth=metres"]
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"ctal-demo exited ({server.returncode}): {(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ctal-demo did not answer on {url} in 300 s")
            time.sleep(0.5)
        yield url, photo, example
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.mark.slow
def test_the_page_in_a_real_browser(demo_server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, photo, example = demo_server
    status = "#status"

    def wait_for_status(page, fragment: str) -> str:
        page.wait_for_function(
            "([selector, fragment]) => (document.querySelector(selector)?.innerText || '').includes(fragment)",
            arg=[status, fragment],
            timeout=300_000,
        )
        return page.locator(status).inner_text()

    def upload(page, path: Path) -> None:
        """As a person does: remove the file shown (the cross), then choose the new one."""
        field = page.locator("#upload input[type=file]")
        if field.count() == 0:
            page.locator("#upload button[aria-label='Clear'], #upload button[title='Clear']").first.click()
            wait_for_status(page, "Upload an image to start")
        field.set_input_files(str(path))

    def assert_no_error_shown(page) -> None:
        text = page.locator("body").inner_text()
        assert "Traceback" not in text and "Error" not in page.locator(status).inner_text(), text[-2000:]
        assert page.locator(".toast-body.error").count() == 0

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = context.new_page()
            page.goto(url, timeout=120_000)
            page.wait_for_selector("#upload input[type=file]", state="attached", timeout=120_000)

            # A real photograph: every task's map appears, and the raw maps download.
            upload(page, photo)
            assert wait_for_status(page, "Predicted 6 task(s) for a 640x480 image")
            assert_no_error_shown(page)
            for task in TASKS:
                picture = page.locator(f"#map-{task} img")
                picture.wait_for(state="visible", timeout=60_000)
                assert picture.get_attribute("src"), task
                assert picture.evaluate("img => img.complete && img.naturalWidth > 100"), task
            link = page.locator("#download a[href*='maps.npz']").first
            response = page.request.get(link.get_attribute("href"))
            assert response.ok
            with np.load(io.BytesIO(response.body())) as maps:
                assert sorted(maps.files) == sorted(TASKS)
                assert maps["semseg"].shape == (480, 640) and maps["normals"].shape == (480, 640, 3)
            page.screenshot(path=str(tmp_path / "demo_all_tasks.png"), full_page=True)

            # Bad uploads: a message in the page, no stack trace, and the page still works afterwards.
            text_file = tmp_path / "notes.txt"
            text_file.write_text("not an image")
            upload(page, text_file)
            assert "notes.txt is not an image this demo can read" in wait_for_status(page, "notes.txt")
            huge = tmp_path / "huge.png"
            PIL.Image.new("1", (20000, 20000)).save(huge)
            upload(page, huge)
            assert "huge.png is far too large" in wait_for_status(page, "huge.png")
            large = tmp_path / "large.png"
            PIL.Image.new("RGB", (2000, 1500)).save(large)
            upload(page, large)
            assert "large.png is 2000x1500 (3 megapixels); this demo takes up to 2 megapixels" in wait_for_status(
                page, "large.png"
            )
            assert "Traceback" not in page.locator("body").inner_text()
            page.screenshot(path=str(tmp_path / "demo_bad_input.png"), full_page=True)

            # Choose tasks, then pick the example: only the chosen maps are shown.
            page.locator("#tasks label", has_text="normals").click()
            page.locator("#tasks label", has_text="edge").click()
            page.get_by_text("pascal.jpg").first.click()
            final = wait_for_status(page, "Predicted 4 task(s)")
            assert "Error" not in final
            for task in TASKS:
                expected = "hidden" if task in ("normals", "edge") else "visible"
                page.locator(f"#map-{task}").wait_for(state=expected, timeout=60_000)
            assert_no_error_shown(page)
        finally:
            context.close()
    assert (tmp_path / "demo_all_tasks.png").stat().st_size > 50_000
