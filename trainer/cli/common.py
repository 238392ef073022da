"""What every subcommand module shares: exit codes and the help for a model argument."""

EXIT_OK, EXIT_FAILED_CHECK, EXIT_BAD_INPUT = 0, 1, 2

MODEL_HELP = (
    "SDXL base: a diffusers folder, a single-file .safetensors checkpoint, builtin:toy-sdxl or builtin:tiny-sdxl"
)
CONFIG_HELP = "diffusers config folder for a single-file model (default: a folder named like the file)"
