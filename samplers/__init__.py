"""samplers: integrate the reverse-time SDE / probability-flow ODE.

Planned public API (shared/DESIGN.md, section 3): pc_sample, ald_sample, ode_sample,
log_likelihood, bits_per_dim. None of them exists yet: they are the subject of the samplers
issue. The reverse-time drift they will all use is ``sde_lib.reverse_drift`` /
``SDE.reverse``.
"""
__all__: list[str] = []
