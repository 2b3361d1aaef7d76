"""How `import ctal_hf` registers CTAL with transformers without importing torch or transformers.

Every registration is the documented call (`AutoConfig.register`, `AutoModel.register` and the per-task
`AutoModelForDepthEstimation` / `AutoModelForSemanticSegmentation` / `AutoModelForNormalEstimation.register`,
`AutoImageProcessor.register`, `PIPELINE_REGISTRY.register_pipeline`, `register_for_auto_class`). What is not plain
is *when* each is made: the registries live in transformers modules that are expensive to import
(`transformers.pipelines` pulls in every pipeline, the image processing modules pull in torchvision, the model class
needs `transformers.modeling_utils`), and making the calls in `ctal_hf/__init__.py` would put all of that, and
torch, into `import ctal_hf` and `ctal-predict --help` (measured: docs/design.md, "Registration"). So each call is
made when the transformers module that holds its registry is first imported (or at once, when it already is): a
small `sys.meta_path` finder runs a callback right after that module has executed. Any lookup through a registry
therefore sees CTAL, while `import ctal_hf` itself costs milliseconds and `ctal-predict --help` answers before torch
is imported.

The model class is registered when the auto-model module is imported, importing the model class then (which imports
`transformers.modeling_utils`); in the one order where that module is itself mid-import at that moment, the
registration is made when the model class is first imported instead. This module is not part of a saved model
folder's code (folders load with `trust_remote_code=True` and register themselves through `auto_map`)."""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable

_CONFIGURATION_AUTO = "transformers.models.auto.configuration_auto"
_MODELING_AUTO = "transformers.models.auto.modeling_auto"
_IMAGE_PROCESSING_AUTO = "transformers.models.auto.image_processing_auto"
_PIPELINES = "transformers.pipelines"


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched module it asks the other finders for the spec and wraps its loader so that
    the module's callbacks run once the module has executed. The original loader is put back right after."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[], None]]] = {}
        self._lock = threading.RLock()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _CallbackLoader(spec.loader, self, fullname)
        return spec

    def run(self, fullname: str) -> None:
        with self._lock:
            callbacks = self.callbacks.pop(fullname, [])
            if not self.callbacks and self in sys.meta_path:
                sys.meta_path.remove(self)
        for callback in callbacks:
            callback()

    def watch(self, fullname: str, callback: Callable[[], None]) -> None:
        """Runs `callback` after `fullname` is imported, or now if it already is."""
        module = sys.modules.get(fullname)
        if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
            callback()
            return
        with self._lock:
            self.callbacks.setdefault(fullname, []).append(callback)
            if self not in sys.meta_path:
                sys.meta_path.insert(0, self)


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader, finder: _PostImportFinder, fullname: str):
        self._loader, self._finder, self._fullname = loader, finder, fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._finder.run(self._fullname)

    def __getattr__(self, name):
        return getattr(self._loader, name)


_FINDER = _PostImportFinder()
_INSTALLED = False


def _config_class() -> type:
    from .configuration_ctal import CTALConfig

    return CTALConfig


def _register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register("ctal", _config_class(), exist_ok=True)


def _is_importing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False)


def _register_models(modeling_auto) -> None:
    """`AutoModel.register(CTALConfig, CTALForDenseMultitask)` and, for the per-task views of the same checkpoint,
    `AutoModelForDepthEstimation.register(CTALConfig, CTALForDepthEstimation)`,
    `AutoModelForSemanticSegmentation.register(CTALConfig, CTALForSemanticSegmentation)` and
    `AutoModelForNormalEstimation.register(CTALConfig, CTALForNormalEstimation)` (`modeling_ctal.AUTO_CLASSES`)."""
    from .modeling_ctal import AUTO_CLASSES

    for auto_class, model_class in AUTO_CLASSES.items():
        getattr(modeling_auto, auto_class).register(_config_class(), model_class, exist_ok=True)


def _register_model() -> None:
    # The model classes need `transformers.modeling_utils`; importing them while that module is mid-import would
    # fail, so in that (rare) order they are registered when first imported (`_register_model_for_auto_class`).
    if _is_importing("transformers.modeling_utils"):
        return
    from transformers.models.auto import modeling_auto

    _register_models(modeling_auto)


def _register_image_processor() -> None:
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from .image_processing_ctal import CTALImageProcessor

    AutoImageProcessor.register(
        _config_class(), image_processor_classes={"torchvision": CTALImageProcessor}, exist_ok=True
    )


def _register_pipeline() -> None:
    # Registered here, not in pipeline_ctal.py: the copy of that file a saved folder carries must not register itself
    # when `pipeline(..., trust_remote_code=True)` loads it, since a registered task hides the folder's
    # `custom_pipelines`.
    from transformers.models.auto.modeling_auto import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    from .configuration_ctal import PIPELINE_TASK
    from .pipeline_ctal import DenseMultitaskPipeline

    if PIPELINE_REGISTRY.supported_tasks.get(PIPELINE_TASK, {}).get("impl") is not DenseMultitaskPipeline:
        PIPELINE_REGISTRY.register_pipeline(
            PIPELINE_TASK, pipeline_class=DenseMultitaskPipeline, pt_model=AutoModel, type="image"
        )


def _register_config_for_auto_class() -> None:
    # Saved folders carry the configuration, modelling and image processing code (`auto_map`), so they load with
    # `trust_remote_code=True` without this package.
    _config_class().register_for_auto_class()


def _register_model_for_auto_class() -> None:
    from .modeling_ctal import AUTO_CLASSES

    for auto_class, model_class in AUTO_CLASSES.items():
        model_class.register_for_auto_class(auto_class)
    modeling_auto = sys.modules.get(_MODELING_AUTO)
    if modeling_auto is not None and not _is_importing(_MODELING_AUTO):
        _register_models(modeling_auto)


def _register_image_processor_for_auto_class() -> None:
    from .image_processing_ctal import CTALImageProcessor

    CTALImageProcessor.register_for_auto_class("AutoImageProcessor")


def install() -> None:
    """Makes every registration, each when its registry (or CTAL class) is first imported. Idempotent."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    _FINDER.watch(f"{__package__}.configuration_ctal", _register_config_for_auto_class)
    _FINDER.watch(f"{__package__}.modeling_ctal", _register_model_for_auto_class)
    _FINDER.watch(f"{__package__}.image_processing_ctal", _register_image_processor_for_auto_class)
    _FINDER.watch(_CONFIGURATION_AUTO, _register_config)
    _FINDER.watch(_MODELING_AUTO, _register_model)
    _FINDER.watch(_IMAGE_PROCESSING_AUTO, _register_image_processor)
    _FINDER.watch(_PIPELINES, _register_pipeline)


__all__ = ["install"]
