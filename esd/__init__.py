"""esd: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023) on diffusers."""

__version__ = "0.1.0"

import logging  # noqa: E402

# diffusers imports bitsandbytes whenever it is installed (we use it for --optimizer adam8bit), and on
# CPUs with AVX512-BF16 bitsandbytes then warns that an optional 4-bit matmul kernel package is missing:
# a kernel ESD never calls. Only that one logger is quietened; bitsandbytes' other warnings still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class _NoImageProcessorFallbackNote(logging.Filter):
    """Without torchvision (an optional extra), importing diffusers' SD pipelines makes transformers note that
    CLIP's and SigLIP's image processors fall back to PIL: processors ESD never uses. Only that note is dropped;
    the logger's other records still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoImageProcessorFallbackNote())

import esd.eval  # noqa: E402, F401 - registers the metrics whose summaries model cards and reports read
from esd.core.methods import TRAIN_METHODS, resolve_method  # noqa: E402
from esd.core.objective import esd_loss, esd_target  # noqa: E402
from esd.families.models import DiffusionModels, load_models  # noqa: E402
from esd.families.registry import FAMILIES, detect_family, select_parameters  # noqa: E402
from esd.families.sources import ModelLoadError  # noqa: E402
from esd.formats.weights import apply_erased_weights, load_erased_unet  # noqa: E402
from esd.pipeline import ESDPipeline  # noqa: E402
from esd.train.config import ESDConfig  # noqa: E402
from esd.train.modelcard import write_model_card  # noqa: E402
from esd.train.presets import PRESETS  # noqa: E402
from esd.train.recipe import ESDTrainer, train_esd  # noqa: E402

__all__ = ["FAMILIES", "PRESETS", "TRAIN_METHODS", "DiffusionModels", "ESDConfig", "ESDPipeline", "ESDTrainer",
           "ModelLoadError", "apply_erased_weights", "detect_family", "esd_loss", "esd_target", "load_erased_unet",
           "load_models", "resolve_method", "select_parameters", "train_esd", "write_model_card"]
