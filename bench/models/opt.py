"""OPT adapter (facebook/opt-*): learned positions, LayerNorm, fc1/fc2 MLP."""

from __future__ import annotations

from torch import nn

from bench.models.adapter import DecoderAdapter


class OptAdapter(DecoderAdapter):
    architectures = ("opt",)
    roles = ("q", "k", "v", "o", "fc1", "fc2")
    norm_feeds = {"attn": ("q", "k", "v"), "mlp": ("fc1",)}
    linear_pairs = (("v", "o"), ("fc1", "fc2"))  # ReLU between fc1 and fc2 commutes with positive scales
    mlp_out_role = "fc2"

    def blocks(self) -> nn.ModuleList:
        return self.model.model.decoder.layers

    def block_linears(self, block):
        a = block.self_attn
        return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.out_proj,
                "fc1": block.fc1, "fc2": block.fc2}

    def block_norms(self, block):
        return {"attn": block.self_attn_layer_norm, "mlp": block.final_layer_norm}

    def mlp_activation(self, block):
        return block.activation_fn  # ReLU for OPT: fc2 reads activation_fn(fc1)

    def norm_consumer(self, block, norm: str):
        return {"attn": block.self_attn, "mlp": block.fc1}[norm]

    def embeddings(self):
        d = self.model.model.decoder
        return [d.embed_tokens, d.embed_positions]

    def final_norm(self):
        return self.model.model.decoder.final_layer_norm
