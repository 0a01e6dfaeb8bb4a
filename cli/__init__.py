"""The `hermes-probe` command line."""
