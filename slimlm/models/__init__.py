"""Model loading and architecture knowledge."""

from slimlm.models.arch import ARCHS, Arch, arch_for
from slimlm.models.load import LoadedModel, ModelInfo, count_params, load

__all__ = ["ARCHS", "Arch", "LoadedModel", "ModelInfo", "arch_for", "count_params", "load"]
