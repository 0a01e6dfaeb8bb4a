"""hermes_probe: attention analysis of streaming video LLMs (recording, metrics, tiers, policies)."""
