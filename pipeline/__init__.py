"""productbg.pipeline: the ComfyUI workflow's data flow on diffusers (CLI, batches, evaluation, demo, previews).

Heavy imports (diffusers, transformers) happen when a pipeline is built, not on ``import productbg.pipeline``.
"""
from .errors import PipelineError

__all__ = ["PipelineError", "ProductBGPipeline", "GenerateSettings", "Prepared", "Result"]


def __getattr__(name: str):
    if name in ("ProductBGPipeline", "GenerateSettings", "Prepared", "Result"):
        from . import pipeline  # lazy: every layer imports productbg.pipeline.errors, which must not load this

        return getattr(pipeline, name)
    raise AttributeError(name)
