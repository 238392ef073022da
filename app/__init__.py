"""DoRA Studio's UI: a thin shell that reads and writes configs and run directories and starts the trainer."""
