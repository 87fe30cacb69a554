"""LLaMA-family adapter: LLaMA, Mistral, Qwen2, SmolLM (same block layout in transformers)."""

from __future__ import annotations

from torch import nn

from bench.models.adapter import DecoderAdapter


class LlamaAdapter(DecoderAdapter):
    architectures = ("llama", "mistral", "qwen2", "qwen3")
    roles = ("q", "k", "v", "o", "gate", "up", "down")
    norm_feeds = {"attn": ("q", "k", "v"), "mlp": ("gate", "up")}
    linear_pairs = (("v", "o"), ("up", "down"))  # (a, b): scaling a's output rows by 1/s and b's columns by s is exact
    mlp_out_role = "down"

    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    def block_linears(self, block):
        a, m = block.self_attn, block.mlp
        return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj,
                "gate": m.gate_proj, "up": m.up_proj, "down": m.down_proj}

    def block_norms(self, block):
        return {"attn": block.input_layernorm, "mlp": block.post_attention_layernorm}

    def mlp_activation(self, block):
        return block.mlp.act_fn  # SiLU for LLaMA/SmolLM: down_proj reads act_fn(gate) * up

    def norm_consumer(self, block, norm: str):
        return {"attn": block.self_attn, "mlp": block.mlp}[norm]

    def embeddings(self):
        return [self.model.model.embed_tokens]

    def final_norm(self):
        return self.model.model.norm
