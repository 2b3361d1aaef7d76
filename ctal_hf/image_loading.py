"""Reading images for the processor, the pipeline and the command-line tools: files, folders and URLs checked for what
they are (a folder, a missing file, a corrupt or oversized image, an HTTP error, a network timeout), each refused
with a message that names the file or URL and the fix."""

import io
import os
from pathlib import Path

import PIL.Image
import PIL.ImageOps

DEFAULT_FETCH_TIMEOUT = 30.0


def pixel_limit() -> int | None:
    """The most pixels an image file may have: Pillow's `PIL.Image.MAX_IMAGE_PIXELS` (about 89 million; set it to
    another number, or None, to change the limit). Larger files are refused before they are decoded (a
    decompression bomb would take gigabytes)."""
    return PIL.Image.MAX_IMAGE_PIXELS


def _check_pixel_count(image: PIL.Image.Image, name: str) -> None:
    limit = pixel_limit()
    width, height = image.size
    if limit is not None and width * height > limit:
        raise ValueError(
            f"{name} is {width} x {height} = {width * height} pixels, more than the limit of {limit} (a "
            "decompression bomb, or a very large image): resize it first, or raise `PIL.Image.MAX_IMAGE_PIXELS` if "
            "you trust the file."
        )


def _open_checked(source, name: str) -> PIL.Image.Image:
    """Opens (header), checks the pixel count, then decodes fully and applies the EXIF orientation."""
    try:
        with PIL.Image.open(source) as image:
            _check_pixel_count(image, name)
            image.load()  # decode now: a truncated file fails here, not later inside a batch
            return PIL.ImageOps.exif_transpose(image)  # a new, file-independent image
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(
            f"{name} is refused as a possible decompression bomb ({error}): resize it first, or raise "
            "`PIL.Image.MAX_IMAGE_PIXELS` if you trust the file."
        ) from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ValueError) and str(error).startswith(name):
            raise
        raise ValueError(
            f"Cannot read {name} as an image ({type(error).__name__}: {error}); the file is corrupt, truncated, or "
            "not an image format Pillow can open."
        ) from error


def fetch_url(url: str, timeout: float | None = None) -> bytes:
    """The body of `url`, with a timeout (`DEFAULT_FETCH_TIMEOUT` unless given) and the HTTP status checked: an
    error names the URL and the status or the network failure."""
    import httpx

    timeout = DEFAULT_FETCH_TIMEOUT if timeout is None else float(timeout)
    if not timeout > 0:
        raise ValueError(f"`timeout` must be a positive number of seconds, got {timeout!r}.")
    try:
        response = httpx.get(url, timeout=timeout, follow_redirects=True)
    except httpx.TimeoutException:
        raise ValueError(
            f"Fetching {url!r} timed out after {timeout:g} s (the server did not answer); check the address, or pass "
            "a larger `timeout=`."
        ) from None
    except httpx.HTTPError as error:
        raise ValueError(
            f"Cannot fetch {url!r} ({type(error).__name__}: {error}); check the address and the network, or download "
            "the file and pass its path."
        ) from None
    if response.status_code >= 400:
        raise ValueError(
            f"Fetching {url!r} failed: the server answered HTTP {response.status_code} {response.reason_phrase}; "
            "check the address."
        )
    return response.content


def load_image(source: "str | os.PathLike | PIL.Image.Image", timeout: float | None = None) -> PIL.Image.Image:
    """Opens an image file (or URL) fully, with EXIF orientation applied; the mode (L, RGBA, ...) is kept so the
    processor can convert it. Raises `FileNotFoundError` for a missing file, `IsADirectoryError` for a folder, and
    `ValueError` naming the file or URL when it is not a readable image (corrupt, truncated, another kind of file,
    above the pixel limit, an HTTP error or a network timeout)."""
    if isinstance(source, PIL.Image.Image):
        return source
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return _open_checked(io.BytesIO(fetch_url(source, timeout)), f"the image at {source!r}")
    path = Path(source)
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder, not an image file; pass the image files in it.")
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {str(path)!r}.")
    return _open_checked(path, repr(str(path)))


__all__ = ["DEFAULT_FETCH_TIMEOUT", "fetch_url", "load_image", "pixel_limit"]
