"""dsjax's Pallas kernels, importable as `dsjax_kernels` (a top-level `kernels` would shadow Hugging Face's
`kernels` package). Each kernel sits beside its pure-jnp reference; only `dsjax.ops` imports from here."""
