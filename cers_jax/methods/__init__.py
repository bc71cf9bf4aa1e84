"""Training methods behind the protocol of `cers_jax.core.method` (config field `method`)."""
