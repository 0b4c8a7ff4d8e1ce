"""slimlm: turn large language models into small ones, and measure what each step costs and buys."""

from slimlm.compress import CompressResult, compress  # noqa: E402
from slimlm.errors import SlimlmError  # noqa: E402
from slimlm.models import LoadedModel, ModelInfo, load  # noqa: E402
from slimlm.recipe import Recipe, Step  # noqa: E402
from slimlm.version import __version__  # noqa: E402

__all__ = ["CompressResult", "LoadedModel", "ModelInfo", "Recipe", "SlimlmError", "Step", "compress", "load", "__version__"]
