"""One module per architecture, each a single ``register_architecture(...)`` call declaring the
architecture's facts. ``decollapse.registry`` imports every module here; nothing else lists them."""
