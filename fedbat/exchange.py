"""Moving client results between processes: the real packet bytes, gathered to every rank.

Each rank serialises its clients' results into one safetensors blob (packets as uint8
tensors, facts in the header), the blobs are padded to a common length and all-gathered, and
every rank parses all of them. With one process this is the identity. A client's own state
(error-feedback residuals, the strategy's) does not travel: the process that trained it
wrote it to the client store (``fedbat/clientstore.py``).
"""

from __future__ import annotations

import json
import warnings

import torch
from lightning.fabric import Fabric
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedbat.client import ClientResult
from fedbat.compressors.packet import read_metadata
from fedbat.errors import PeerLost


def serialise(results: list[ClientResult]) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    facts = []
    for r in results:
        tensors[f"{r.client}/packet"] = (
            torch.frombuffer(bytearray(r.data), dtype=torch.uint8)
            if r.data
            else torch.zeros(0, dtype=torch.uint8)
        )
        facts.append({k: getattr(r, k) for k in FACTS})
    return st_save(tensors, metadata={"facts": json.dumps(facts)})


# what travels of a result beside its packet, by name (its own state stays in the store)
FACTS = ("client", "payload_bits", "num_samples", "train_loss", "compress_s", "failure",
         "logs", "stored", "reset")  # fmt: skip


def deserialise(blob: bytes) -> list[ClientResult]:
    tensors = st_load(blob)
    out = []
    for facts in json.loads(read_metadata(blob)["facts"]):
        data = tensors[f"{facts['client']}/packet"].numpy().tobytes()
        out.append(ClientResult(data=data, **{k: facts[k] for k in FACTS}))
    return out


def gather(fabric: Fabric, results: list[ClientResult]) -> list[ClientResult]:
    """Every rank's results, on every rank, sorted by client id."""
    if fabric.world_size == 1:
        return sorted(results, key=lambda r: r.client)
    blob = torch.frombuffer(bytearray(serialise(results)), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*all_gather is deprecated")
            sizes = fabric.all_gather(torch.tensor([blob.numel()], device=fabric.device))
            padded = torch.zeros(int(sizes.max()), dtype=torch.uint8)
            padded[: blob.numel()] = blob
            gathered = fabric.all_gather(padded.to(fabric.device)).cpu()
    except RuntimeError as err:  # gloo / NCCL: a peer exited mid-collective
        cause = (str(err).strip() or type(err).__name__).splitlines()[0].split(". ")[0]
        raise PeerLost(
            f"rank {fabric.global_rank}: another process stopped during the packet exchange "
            f"({cause[:200]}); its own output says why"
        ) from None
    merged = []
    for rank, size in enumerate(sizes.reshape(-1).tolist()):
        merged += deserialise(gathered[rank, :size].numpy().tobytes())
    return sorted(merged, key=lambda r: r.client)
