"""The web demo (`ctal-demo`, and `app.py` at the repository root for a Hugging Face Space); not carried in saved
model folders.

- `cli`: the `ctal-demo` command line, checked before gradio or torch is imported.
- `rendering`: the pictures (legend, colour bars), the upload checks and the `.npz` of raw maps; no gradio.
- `app`: the Gradio page (`build_demo`), needing the `ctal-hf[demo]` extra."""

# Uploads with more pixels than this are refused with a message (a 12-megapixel phone photo passes); the maps are
# predicted at the model's input size and resized back, so a larger photo shows nothing more.
DEFAULT_MAX_PIXELS = 40_000_000
