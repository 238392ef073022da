"""A VeRA / DVoRA file read back as what it was trained as: its shared projections rebuilt, its vectors recovered.

The file's tensors are a plain LoRA (VeRA) or DoRA (DVoRA) file's, so front ends need nothing of this. What
needs it is anything that treats the file as VeRA again (``inspect`` says whether it still is one): the
projections are rebuilt from the ``dora_studio.vera`` record (``trainer.kohya.metadata``) and checked against
its digest, and every stem's factors must be row scalings of them (``adapters.vera.recover_vectors``).
A file that fails either check is refused with the reason, never read as silently different vectors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from torch import Tensor

from trainer.adapters.vera import LOAD_TOLERANCE, SharedProjections, recover_vectors
from trainer.errors import AdapterFileError
from trainer.sdxl.naming import parse_stem_part

from .adapter_file import LoadedAdapter
from .metadata import VERA_KEY


@dataclass
class VeraFile:
    """The record of a VeRA / DVoRA file and, per stem, its vectors d (over the rank) and b (over the outputs)."""

    kind: str
    d_initial: float
    projections: dict[str, SharedProjections]  # by part
    vectors: dict[str, tuple[Tensor, Tensor]]  # by stem

    def summary(self) -> dict:
        return {
            "kind": self.kind,
            "d_initial": self.d_initial,
            "projections": {part: p.describe() for part, p in self.projections.items()},
            "stems_checked": len(self.vectors),
        }


def read_vera_file(loaded: LoadedAdapter, source: str) -> VeraFile | None:
    """The file as VeRA / DVoRA (None when it has no VeRA record); ``source`` names it in errors."""
    if VERA_KEY not in loaded.metadata:
        return None

    def refuse(where: str, reason: str) -> AdapterFileError:
        return AdapterFileError.at(
            source,
            f"{where}: {reason}. It is not usable as a VeRA/DVoRA adapter (front ends still load its tensors "
            "as a plain LoRA/DoRA file); re-export it from its run",
        )

    try:
        record = json.loads(loaded.metadata[VERA_KEY])
        kind, d_initial, recorded = record["kind"], float(record["d_initial"]), dict(record["projections"])
    except (ValueError, KeyError, TypeError) as error:
        raise refuse(f"metadata {VERA_KEY}", f"unreadable ({error})") from None
    projections: dict[str, SharedProjections] = {}
    for part, description in recorded.items():
        try:
            projections[part] = SharedProjections.rebuild(description)
        except (ValueError, TypeError) as error:
            raise refuse(f"the {part} projections", str(error)) from None
    vectors = {}
    for stem, weights in sorted(loaded.adapters.items()):
        try:
            part = parse_stem_part(stem)
            shared = projections[part]
        except (ValueError, KeyError):
            raise refuse(stem, "no recorded projections for this stem's part") from None
        rank = weights.rank
        if not shared.fits(rank, tuple(weights.down.shape), weights.up.shape[0]):
            raise refuse(stem, f"rank {rank} and shapes {tuple(weights.down.shape)} exceed the recorded projections")
        down_basis = shared.down_basis(rank, tuple(weights.down.shape))
        up_basis = shared.up_basis(rank, tuple(weights.up.shape))
        try:
            vectors[stem] = recover_vectors(weights.down, weights.up, down_basis, up_basis, LOAD_TOLERANCE)
        except ValueError as error:
            raise refuse(stem, str(error)) from None
    return VeraFile(kind, d_initial, projections, vectors)
