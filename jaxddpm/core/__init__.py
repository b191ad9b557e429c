"""Floor 1, the math: pure functions of arrays and process pytrees (imports only jax, numpy, flax.struct).

schedule (DDPM's discrete tables), process (continuous alpha/sigma paths), diffusion (q_sample, output
conversions, posteriors), losses (the discrete bound and the continuous objectives), samplers (the
`lax.scan` engine and one stepper per file).
"""
