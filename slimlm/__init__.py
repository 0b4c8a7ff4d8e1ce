"""slimlm: turn large language models into small ones, and measure what each step costs and buys."""

from slimlm.compress import CompressResult, compress  # noqa: E402
from slimlm.errors import SlimlmError  # noqa: E402
from slimlm.export import ExportResult, export  # noqa: E402
from slimlm.models import LoadedModel, ModelInfo, load  # noqa: E402
from slimlm.recipe import Recipe, Step  # noqa: E402
from slimlm.version import __version__  # noqa: E402


def generate(lm: LoadedModel, prompt: str | list[int], *, chat: bool = False, **options) -> str:
    """Text generated for ``prompt`` by the engine; ``options`` are :class:`slimlm.runtime.sampling.GenConfig` fields."""
    from slimlm.runtime.engine import engine_for
    from slimlm.runtime.sampling import GenConfig

    return engine_for(lm).generate(prompt, GenConfig(**options), chat=chat).text  # type: ignore[union-attr]


__all__ = ["CompressResult", "ExportResult", "LoadedModel", "ModelInfo", "Recipe", "SlimlmError", "Step", "compress",
           "export", "generate", "load", "__version__"]
