"""The attention function the text model runs (``hermes_ragged``): one module per path,
a dispatcher, and the capture of attention probabilities the probe and the rules read."""
