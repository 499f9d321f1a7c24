"""What an extension of the ESD recipe is: a part of training beside the ESD rows (robust ESD, text-encoder
training) that the recipe (:class:`esd.train.recipe.ESDTrainer`) calls at fixed points, so that the recipe
holds no branch for any one of them. Each extension declares its settings (a dataclass of
:func:`esd.core.settings.setting` fields that :class:`esd.train.config.ESDConfig` is made of) and their
checks in its own module; the hooks below default to "nothing to add"."""

import torch

from esd.core.views import TrainedRows


class Extension:
    """The hooks, in the order the recipe calls them."""

    name: str = ""  # its key in a checkpoint (where :meth:`state_dict` is not None)

    def param_group(self) -> tuple[list[torch.nn.Parameter], float | None]:
        """Parameters it trains beside the denoiser's, and their learning rate (None: --lr)."""
        return [], None

    def conditioning(self):
        """Where theta's conditioning of the concept comes from instead of the encoded prompts (an object with
        ``source(concept)``, as :class:`esd.core.sampler.PromptConditioning`), or None."""
        return None

    def header(self) -> str:
        """Added to the training header's line of trained parameters."""
        return ""

    def rows(self, views, batch, generator: torch.Generator) -> list[TrainedRows]:
        """Latent rows with their own targets, trained in the same forward as the ESD rows of ``batch``."""
        return []

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """Its trained tensors (fp32, CPU) under the names a weights file and a checkpoint give them."""
        return {}

    def load_trained(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take its tensors back from a checkpoint's (every name of :meth:`trained_tensors` is there)."""

    def state_dict(self) -> dict | None:
        """What a checkpoint must hold beyond the tensors to resume exactly (None: nothing)."""
        return None

    def load_state_dict(self, state: dict | None) -> None:
        """Resume from :meth:`state_dict`'s value (None: a checkpoint written without it)."""

    def record_entries(self) -> dict:
        """Its entries in the run's args.json."""
        return {}
