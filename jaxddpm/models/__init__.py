"""Floor 2: the DDPM UNet (Flax linen) and its named configurations."""
from jaxddpm.models.presets import (PRESET_INPUT_SHAPES, PRESETS, count_params, make_unet,
                                    validate_unet_config)
from jaxddpm.models.unet import AttnBlock, Downsample, ResnetBlock, UNet, Upsample, timestep_embedding

__all__ = ["PRESETS", "PRESET_INPUT_SHAPES", "UNet", "ResnetBlock", "AttnBlock", "Downsample", "Upsample",
           "timestep_embedding", "make_unet", "validate_unet_config", "count_params"]
