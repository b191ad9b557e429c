"""The sampler seam: `engine` (one lax.scan over a time grid), `grids`, and one stepper per file."""
