"""Federated fine-tuning with LoRA adapters (Hugging Face PEFT) on real text every machine
has. The byte-level transformer of ``stdlib_text.py`` is first pretrained centrally on one
part of the Python standard library's sources (the "pretrained" checkpoint, cached in
``runs/stdlib_lora/pretrained.pt``), then fine-tuned federatedly on another part, one
client per file. With ``get_peft_model`` the base weights are frozen: only the adapters'
``lora_A`` / ``lora_B`` travel, through whichever compressor is chosen.

    python examples/stdlib_lora.py compressor=fedbat       # LoRA, one configuration
    python examples/stdlib_lora.py --full compressor=none  # full fine-tuning instead
    python examples/stdlib_lora.py --table                 # the README's comparison

Needs ``pip install peft`` (or ``pip install "fedbat[peft]"``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from stdlib_text import ByteNet, ByteTransformer, SourceWindows, file_of, stdlib_files

import fedbat
from fedbat.config import run_name

PRETRAINED = Path("runs/stdlib_lora/pretrained.pt")
PRETRAIN_STEPS = 400
LORA_LR = 5e-3  # adapters take a larger step than full fine-tuning (Adam)
TARGETS = ["qkv", "proj", "mlp.0", "mlp.2"]  # every Linear of the blocks
FINE_TUNE = [
    "fed.rounds=8",
    "fed.clients_per_round=8",
    "fed.local_epochs=1",
    "fed.batch_size=32",
    "policy.modules=[Linear,Embedding]",
]


def corpora(files: int = 24) -> tuple[list[Path], list[Path]]:
    """Disjoint parts of the standard library: the pretraining files and the fine-tuning
    files (the first ``files`` by name are fine-tuned on, the next 40 pretrained on)."""
    paths = stdlib_files(files + 40)
    return paths[files:], paths[:files]


def pretrained(path: Path = PRETRAINED) -> ByteNet:
    """The pretrained ByteNet: loaded when cached, else trained centrally (Adam, batch 32,
    ``PRETRAIN_STEPS`` steps) and saved."""
    torch.manual_seed(0)
    net = ByteNet()
    if path.is_file():
        net.load_state_dict(torch.load(path, weights_only=True))
        return net
    data = SourceWindows(corpora()[0], train=True)
    loader = DataLoader(data, 32, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    steps = 0
    while steps < PRETRAIN_STEPS:
        for batch in loader:
            loss = F.cross_entropy(net(batch["ids"]).flatten(0, 1), batch["targets"].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps == PRETRAIN_STEPS:
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net


def lora(net: ByteNet, rank: int = 4) -> torch.nn.Module:
    """``net`` with rank-``rank`` LoRA adapters on every Linear of its blocks; PEFT freezes
    the rest."""
    return get_peft_model(net, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))


def perplexity(module: ByteTransformer, data: SourceWindows) -> float:
    """Test perplexity of ``module``, computed here (not by fedbat): exp of the mean
    next-byte cross-entropy over every test window."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in DataLoader(data, 256):
            logits = module(batch["ids"]).flatten(0, 1)
            total += F.cross_entropy(logits, batch["targets"].flatten(), reduction="sum").item()
            count += batch["targets"].numel()
    return float(torch.tensor(total / count).exp())


def fine_tune(overrides: list[str], full: bool = False) -> dict:
    """Fine-tune the pretrained model federatedly (LoRA, or every weight with ``full``);
    the summary gains the perplexity before and after and the bits per client a round."""
    net = pretrained()
    module = ByteTransformer(net, lr=1e-3) if full else ByteTransformer(lora(net), lr=LORA_LR)
    train, test = (SourceWindows(corpora()[1], train=t) for t in (True, False))
    before = perplexity(module, test)
    name = run_name(overrides)
    mode = "full" if full else "lora"
    run_dir = [f"run_dir='runs/stdlib_lora/{mode}/{name}'"]
    if any(o.startswith("run_dir=") for o in overrides):
        run_dir = []
    args = [*FINE_TUNE, *run_dir, *overrides]
    summary = fedbat.fit(module, train_dataset=train, test_dataset=test, client_key=file_of,
                         overrides=args)  # fmt: skip
    per_round = next(
        int(a.split("=")[1]) for a in reversed(args) if a.startswith("fed.clients_per_round=")
    )
    per_client = per_round * summary["rounds"]
    return summary | {
        "mode": mode,
        "ppl_before": before,
        "ppl_after": summary["final_acc"],  # fedbat's test/ppl of the final global model
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "uplink_bits_per_client": summary["bits_uplink_total"] / per_client,
    }


def table() -> str:
    """LoRA under none, fedbat and topk against full fine-tuning, as a Markdown table."""
    runs = [
        ("LoRA r=4", "none", False),
        ("LoRA r=4", "fedbat", False),
        ("LoRA r=4", "topk", False),
        ("full", "none", True),
        ("full", "fedbat", True),
    ]
    lines = [
        "| fine-tuning | compressor | trainable | ppl before | ppl after "
        "| uplink bits / client / round |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, compressor, full in runs:
        s = fine_tune([f"compressor={compressor}", "progress=false"], full)
        lines.append(
            f"| {label} | `{compressor}` | {s['trainable']:,} | {s['ppl_before']:.2f} | "
            f"{s['ppl_after']:.2f} | {s['uplink_bits_per_client']:,.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--table" in args:
        print(table())
    else:
        s = fine_tune([a for a in args if a != "--full"], full="--full" in args)
        print(
            f"{s['mode']}: test perplexity {s['ppl_before']:.2f} -> {s['ppl_after']:.2f}, "
            f"{s['uplink_bits_per_client']:,.0f} uplink bits per client a round"
        )
