"""Paged attention kernels (decode, ragged) and their pure-jnp reference."""
