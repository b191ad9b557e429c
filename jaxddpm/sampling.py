"""Moved: the samplers live in `jaxddpm.core.samplers` (the engine, grids, one stepper per file) and their
mesh/padding code in `jaxddpm.parallel`. This module re-exports the names it always had.

Public names:
  p_sample, ddim_step       one reverse step, for research code that writes its own loop;
  sample                    the whole chain for one batch, model_fn(x_t, t); traceable;
  make_sampler              a jitted, batch-sharded sampler(params, key, sample_offset);
  sample_batched            any number of samples in fixed-size sharded batches (pad and drop).
"""
from jaxddpm.core.samplers.ancestral import _batch_view, p_sample  # noqa: F401
from jaxddpm.core.samplers.base import SamplerConfig  # noqa: F401
from jaxddpm.core.samplers.ddim import check_eta as _check_eta, ddim_sigma, ddim_step  # noqa: F401
from jaxddpm.core.samplers.engine import (METHODS, X_T_TAG, _check_model_output, check_shape as _check_shape,  # noqa: F401
                                          make_config as _make_config, run_chain, sample,
                                          sample_keys as _sample_keys, segment_length, snapshot_indices)
from jaxddpm.core.samplers.grids import resolve_timesteps  # noqa: F401
from jaxddpm.parallel import data_mesh, make_sampler, sample_batched  # noqa: F401
