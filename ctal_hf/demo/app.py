"""The Gradio page of the demo: upload (or pick an example), choose tasks, see one captioned picture per task and
download the raw maps. `build_demo` takes a loaded `pipeline("dense-multitask")`, so the same page runs under
`ctal-demo` and in a Space's `app.py`; gradio is imported here only (the `ctal-hf[demo]` extra)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from .rendering import DEFAULT_MAX_PIXELS, DemoInputError, DisplayInfo, check_upload, render_all, save_raw_maps

logger = logging.getLogger(__name__)

TITLE = "CTAL: multitask dense prediction"


def _task_title(task: Any) -> str:
    return f"{task.title or task.name} ({task.name})"


class DemoPredictor:
    """The page's callback: checks the upload, runs the pipeline on the chosen tasks, renders every map and writes
    the `.npz` of raw maps. Every problem comes back as a status sentence, never as an exception."""

    def __init__(self, predictor: Any, info: DisplayInfo, max_pixels: int = DEFAULT_MAX_PIXELS, workdir=None):
        self.predictor = predictor
        self.tasks = predictor.task_objects
        self.info = info
        self.max_pixels = int(max_pixels)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ctal-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    def __call__(self, path: str | None, chosen: Sequence[str] | None):
        hidden = [gr.Image(value=None, visible=task in (chosen or [])) for task in self.tasks]
        if not path:  # the upload was cleared
            return ["Upload an image to start.", None, None, *hidden]
        try:
            if not chosen:
                raise DemoInputError("Choose at least one task.")
            image = check_upload(path, self.max_pixels)
            start = time.perf_counter()
            result = self.predictor(image, tasks=list(chosen), visualize=False)
            pictures = render_all(result, self.tasks, self.info)
            folder = Path(tempfile.mkdtemp(prefix="maps-", dir=self.workdir))
            archive = save_raw_maps(result, list(chosen), folder, Path(path).stem)
        except DemoInputError as error:
            gr.Warning(str(error))
            return [f"**Error:** {error}", None, None, *hidden]
        except Exception as error:  # the page shows one line; the log keeps the traceback
            logger.exception("prediction failed")
            message = f"Prediction failed ({type(error).__name__}: {error})."
            gr.Warning(message)
            return [f"**Error:** {message}", None, None, *hidden]
        seconds = time.perf_counter() - start
        width, height = image.size
        status = f"Predicted {len(pictures)} task(s) for a {width}x{height} image in {seconds:.1f} s."
        outputs = [
            gr.Image(value=pictures.get(task), visible=task in pictures, label=_task_title(self.tasks[task]))
            for task in self.tasks
        ]
        return [status, image.convert("RGB"), str(archive), *outputs]


def build_demo(
    predictor: Any,
    examples: Sequence[str | os.PathLike] = (),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    units: dict[str, str] | None = None,
    title: str = TITLE,
) -> gr.Blocks:
    """The page for a loaded `pipeline("dense-multitask")`; `examples` are image files offered under the upload,
    `units` (task -> unit) overrides the units of the config's regression tasks on the colour bars."""
    config = predictor.model.config
    callback = DemoPredictor(predictor, DisplayInfo.from_config(config, units), max_pixels)
    names = list(callback.tasks)
    model_name = getattr(config, "_name_or_path", "") or "model"
    with gr.Blocks(title=title) as demo:
        gr.Markdown(
            f"# {title}\nModel `{Path(model_name).name if os.path.isdir(model_name) else model_name}` predicts "
            f"{', '.join(_task_title(callback.tasks[name]) for name in names)}. Upload a photo (or pick an example); "
            "each task's map is shown at the photo's size, and the raw maps download as one `.npz` "
            "(`numpy.load(path)[task]`)."
        )
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image", type="filepath", elem_id="upload")
                chosen = gr.CheckboxGroup(choices=names, value=names, label="Tasks", elem_id="tasks")
                button = gr.Button("Predict", variant="primary", elem_id="predict")
                status = gr.Markdown("Upload an image to start.", elem_id="status")
                download = gr.File(label="Raw maps (.npz)", interactive=False, elem_id="download")
                if examples:
                    gr.Examples(examples=[[str(path)] for path in examples], inputs=[upload], label="Examples")
            with gr.Column(scale=2):
                preview = gr.Image(label="Input", interactive=False, elem_id="input-preview")
                pictures = []
                for start in range(0, len(names), 2):  # two maps a row
                    with gr.Row():
                        for name in names[start : start + 2]:
                            label = _task_title(callback.tasks[name])
                            pictures.append(gr.Image(label=label, interactive=False, elem_id=f"map-{name}"))
        outputs = [status, preview, download, *pictures]
        # One queue for both events: the pipeline runs one image at a time.
        button.click(callback, inputs=[upload, chosen], outputs=outputs, concurrency_id="predict")
        upload.change(callback, inputs=[upload, chosen], outputs=outputs, concurrency_id="predict")  # upload, example
    return demo


__all__ = ["DemoPredictor", "TITLE", "build_demo"]
