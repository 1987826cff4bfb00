"""Exact bit accounting per round and cumulative, from the packets that actually moved."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fedbat.client import ClientResult
from fedbat.compressors import TensorSpec
from fedbat.downlink import Delivery


def fp32_bits(plan: list[TensorSpec]) -> int:
    """Payload bits of one uncompressed update (each tensor in its own dtype)."""
    return sum(s.numel * s.dtype.itemsize * 8 for s in plan)


@dataclass
class BitCounter:
    """Cumulative bits per direction; checkpointed so a resumed run continues the sums."""

    uplink: int = 0
    downlink: int = 0
    uplink_payload: int = 0
    downlink_payload: int = 0

    def add_round(
        self, results: list[ClientResult], sent_down: list[Delivery], plan: list[TensorSpec]
    ) -> dict[str, float]:
        """Count one round: uplink = every accepted-for-decoding client packet; downlink =
        what each sampled client was sent to catch up (fedbat/downlink.py)."""
        sent = [r for r in results if r.ok]
        up = sum(8 * len(r.data) for r in sent)
        up_payload = sum(r.payload_bits for r in sent)
        down = sum(d.bits for d in sent_down)
        down_payload = sum(d.payload_bits for d in sent_down)
        self.uplink += up
        self.downlink += down
        self.uplink_payload += up_payload
        self.downlink_payload += down_payload
        raw = fp32_bits(plan)
        return {
            "bits/uplink": up,
            "bits/downlink": down,
            "bits/total": up + down,
            "bits/uplink_payload": up_payload,
            "bits/downlink_payload": down_payload,
            "bits/uplink_cum": self.uplink,
            "bits/downlink_cum": self.downlink,
            "bits/total_cum": self.uplink + self.downlink,
            "compression/uplink_ratio": raw * len(sent) / up if up else 0.0,
            "compression/downlink_ratio": raw * len(sent_down) / down if down else 0.0,
            "compression/uplink_payload_ratio": raw * len(sent) / up_payload if up else 0.0,
        }

    def state_dict(self) -> dict[str, int]:
        return asdict(self)
