"""Where a run's log lines go: its ``train.log`` always, the terminal too (above the progress bar)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

FORMAT = "%(asctime)s %(levelname)s %(message)s"


@contextlib.contextmanager
def log_to(path: Path) -> Iterator[logging.Logger]:
    """Log ``dora_studio`` messages to ``path`` (appending, so a resume continues the same log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("dora_studio")
    logger.setLevel(logging.INFO)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(FORMAT))
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(file_handler)
    logger.addHandler(console)
    try:
        with logging_redirect_tqdm(loggers=[logger]):
            yield logger
    except BaseException as error:
        logger.removeHandler(console)  # the CLI prints the error itself; the log file keeps it too
        logger.error("%s: %s", type(error).__name__, error, exc_info=True)
        raise
    finally:
        logger.removeHandler(file_handler)
        logger.removeHandler(console)
        file_handler.close()
