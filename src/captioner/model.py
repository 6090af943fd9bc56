"""Where the merge model lived before captioner/models/: kept so that `import captioner.model`
(the model cards of earlier runs say so) still registers the Keras classes of every decoder."""

from captioner.models import merge as _merge  # noqa: F401  (registers captioner>MergeModel, ...)
from captioner.models.merge import MergeImageText, MergeModel, build_model, compile_model

__all__ = ["MergeImageText", "MergeModel", "build_model", "compile_model"]
