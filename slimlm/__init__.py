"""slimlm: turn large language models into small ones, and measure what each step costs and buys."""

__version__ = "0.1.0"

from slimlm.compress import CompressResult, compress  # noqa: E402
from slimlm.errors import SlimlmError  # noqa: E402
from slimlm.export import ExportResult, export  # noqa: E402
from slimlm.models import LoadedModel, ModelInfo, load  # noqa: E402
from slimlm.recipe import Recipe, Step  # noqa: E402

__all__ = ["CompressResult", "ExportResult", "LoadedModel", "ModelInfo", "Recipe", "SlimlmError", "Step", "compress", "export", "load", "__version__"]
