"""LoRA adapters with Hugging Face PEFT (``examples/stdlib_lora.py``): only ``lora_A`` /
``lora_B`` travel, through every compressor in both directions, and the frozen base model
stays bitwise as loaded; Hugging Face ``transformers`` models (tiny, randomly initialised:
no download) train the same way."""

import csv
import importlib.util
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import fedbat
import fedbat.compressors as C
from fedbat import checkpoint

EXAMPLES = Path(__file__).parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
spec = importlib.util.spec_from_file_location("stdlib_lora", EXAMPLES / "stdlib_lora.py")
stdlib_lora = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stdlib_lora)
text = sys.modules["stdlib_text"]

FILES = text.stdlib_files(4)
SMALL = ["fed.rounds=2", "fed.clients_per_round=4", "progress=false", "fed.batch_size=64"]
SMALL += ["policy.modules=[Linear,Embedding]"]


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def fit(module: L.LightningModule, run_dir: Path, *overrides: str) -> dict:
    return fedbat.fit(
        module,
        train_dataset=text.SourceWindows(FILES, train=True),
        test_dataset=text.SourceWindows(FILES, train=False),
        client_key=text.file_of,
        overrides=[*SMALL, f"run_dir={run_dir}", *overrides],
    )


def lora_module() -> text.ByteTransformer:
    torch.manual_seed(0)
    return text.ByteTransformer(stdlib_lora.lora(text.ByteNet(dim=32, depth=1)), lr=5e-3)


def adapter_bits(module: torch.nn.Module, name: str) -> int:
    """One packet of the adapters alone, built by hand from the module's lora tensors."""
    plan = [
        C.TensorSpec(n, p.shape, p.dtype, True)  # each >= policy.min_numel elements
        for n, p in module.named_parameters()
        if "lora_" in n
    ]
    update = {s.name: torch.zeros(s.shape) for s in plan}
    return C.encode_update(update, plan, C.build(name), torch.Generator()).bits


@pytest.mark.parametrize("compressor", C.available())
def test_only_the_adapters_travel_and_the_base_never_moves(tmp_path, compressor):
    module = lora_module()
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    fit(module, tmp_path, f"compressor={compressor}")
    final = checkpoint.load(tmp_path / "checkpoint.pt")["server"]["global"]
    lora = [k for k in initial if "lora_" in k]
    assert len(lora) == 8  # A and B of qkv, proj, mlp.0, mlp.2
    moved = {k for k, v in initial.items() if not torch.equal(final[k], v)}
    assert moved == set(lora), sorted(moved ^ set(lora))  # bitwise: the base as loaded
    r = rows(tmp_path)[1]  # round 2: every client already holds the base model
    assert int(r["bits/uplink"]) == 4 * adapter_bits(module, compressor)
    assert int(r["bits/downlink"]) == 4 * adapter_bits(module, compressor)


def test_fedbat_binarizes_the_adapter_updates(tmp_path):
    fit(lora_module(), tmp_path, "compressor=fedbat")
    # by hand: 1 bit per adapter element (2,048) and one fp32 step size per matrix (8),
    # for each of the 4 clients
    assert int(rows(tmp_path)[0]["bits/uplink_payload"]) == 4 * (2048 + 8 * 32)


class CausalLM(L.LightningModule):
    """A Hugging Face causal LM as a LightningModule, as users write one."""

    def __init__(self, model: torch.nn.Module, lr: float = 5e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch["ids"], labels=batch["ids"]).loss

    def test_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.model(input_ids=batch["ids"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        self.log("test/loss", loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def tiny(kind: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                         bos_token_id=0, eos_token_id=0)  # fmt: skip
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(cfg)


# GPT-2 keeps its projections in transformers' Conv1D (not a torch.nn type), Llama in Linear
TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_hugging_face_model_with_lora_trains_its_adapters_only(tmp_path, kind):
    model = get_peft_model(tiny(kind), LoraConfig(r=4, target_modules=TARGETS[kind]))
    module = CausalLM(model)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    summary = fit(module, tmp_path, "compressor=fedbat", "fed.rounds=3")
    losses = [float(r["test/loss"]) for r in rows(tmp_path)]
    assert summary["monitor"] == "test/loss" and losses[-1] < losses[0], losses
    final = checkpoint.load(tmp_path / "checkpoint.pt")["server"]["global"]
    moved = {k for k, v in initial.items() if not torch.equal(final[k], v)}
    assert moved and all("lora_" in k for k in moved), sorted(moved)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_hugging_face_model_trains_in_full(tmp_path, kind):
    """Without adapters every weight trains; GPT-2's Conv1D weights are compressed when
    ``policy.include`` names them (``policy.modules`` takes torch.nn types only), and its
    tied ``lm_head.weight`` (the token embedding itself) travels once, as the embedding."""
    include = ["policy.include=[*.c_attn.weight,*.c_proj.weight,*.c_fc.weight]"]
    module = CausalLM(tiny(kind))
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    summary = fit(module, tmp_path, "compressor=fedbat", *include)
    assert summary["final_acc"] is not None
    # what stays fp32 is biases and norms: 1/17 of GPT-2's elements, 1/33 of Llama's
    assert float(rows(tmp_path)[0]["compression/uplink_ratio"]) > 15
    final = checkpoint.load(tmp_path / "checkpoint.pt")["server"]["global"]
    emb = "model.transformer.wte.weight" if kind == "gpt2" else "model.model.embed_tokens.weight"
    assert not torch.equal(final[emb], initial[emb])
    if kind == "gpt2":  # still one tensor under two names
        assert torch.equal(final["model.lm_head.weight"], final[emb])


@pytest.mark.slow
def test_the_example_fine_tunes_and_its_perplexity_is_what_it_says(tmp_path, monkeypatch):
    """The example's own run, shortened: LoRA lowers the pretrained model's perplexity on
    the fine-tuning files, and fedbat's test/ppl equals the example's hand computation."""
    monkeypatch.chdir(tmp_path)  # the pretrained checkpoint goes under runs/
    s = stdlib_lora.fine_tune(["compressor=none", "fed.rounds=3", "progress=false"])
    assert (tmp_path / stdlib_lora.PRETRAINED).is_file()
    assert s["ppl_after"] < s["ppl_before"] < 20, s
    module = text.ByteTransformer(stdlib_lora.lora(stdlib_lora.pretrained()))
    run = next((tmp_path / "runs" / "stdlib_lora" / "lora").iterdir())
    state = checkpoint.load(run / "checkpoint.pt")["server"]["global"]
    module.load_state_dict(state)
    test = text.SourceWindows(stdlib_lora.corpora()[1], train=False)
    assert stdlib_lora.perplexity(module, test) == pytest.approx(s["ppl_after"], rel=1e-4)
