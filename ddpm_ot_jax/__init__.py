"""ddpm_ot_jax: the DDPM probability-flow encoder vs optimal transport, and DPM-OT."""
