"""DoRA Studio's engine: adapter math, naming, file format, models, data, training, sampling, CLI."""

__version__ = "0.1.0"
