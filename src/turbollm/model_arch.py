"""ModelArch: the architecture numbers of a decoder-only transformer, read from an HF config.

Every loader (HF directory, GGUF, dummy), the engine's cache sizing and the planner read the
model through this one dataclass, so they all agree on shapes and parameter counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# HF `architectures` / `model_type` values that run on our Llama-family model file.
LLAMA_FAMILY = {"llama", "mistral", "qwen2", "smollm", "smollm2"}


@dataclass
class ModelArch:
    """Shapes of a decoder-only transformer; field names follow HF config.json."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 0  # 0 -> hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    gated_mlp: bool = True  # SwiGLU (gate, up, down); False -> 2-matrix MLP (Falcon, GPT-2)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, if known
    architectures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.head_dim <= 0:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError("hidden_size must be divisible by num_attention_heads")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = [int(t) for t in (self.eos_token_id or [])]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def is_llama_family(self) -> bool:
        return self.model_type in LLAMA_FAMILY

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArch":
        """Build from a parsed HF config.json (Llama, Mistral, Qwen2, Falcon, ...)."""
        model_type = cfg.get("model_type", "llama")
        if model_type in ("falcon", "RefinedWeb", "RefinedWebModel"):
            return cls._from_falcon(cfg)
        heads = cfg["num_attention_heads"]
        window = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        eos = cfg.get("eos_token_id")
        # transformers >= 5 writes `rope_parameters` (theta inside); older configs write
        # `rope_theta` and `rope_scaling` side by side.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = cfg.get("rope_theta", rope.pop("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default")
                                              != "default" else None)
        return cls(
            model_type=model_type,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            vocab_size=cfg["vocab_size"],
            head_dim=cfg.get("head_dim") or 0,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            sliding_window=window,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=[] if eos is None else eos,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            architectures=list(cfg.get("architectures") or []),
        )

    @classmethod
    def _from_falcon(cls, cfg: dict[str, Any]) -> "ModelArch":
        hidden = cfg["hidden_size"]
        heads = cfg.get("num_attention_heads") or cfg["n_head"]
        if cfg.get("new_decoder_architecture"):
            kv_heads = cfg.get("num_kv_heads") or heads
        elif cfg.get("multi_query", True):
            kv_heads = 1
        else:
            kv_heads = heads
        return cls(
            model_type="falcon",
            hidden_size=hidden,
            intermediate_size=cfg.get("ffn_hidden_size") or 4 * hidden,
            num_hidden_layers=cfg.get("num_hidden_layers") or cfg["n_layer"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            attention_bias=bool(cfg.get("bias", False)),
            gated_mlp=False,
            torch_dtype=cfg.get("torch_dtype"),
            architectures=list(cfg.get("architectures") or []),
        )

    # ----- parameter counts (used by the planner and checked against loaded models) -----
    def linear_params_per_layer(self) -> int:
        """Weights of the projection matrices of one decoder layer (no norms, no biases)."""
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp_mats = 3 if self.gated_mlp else 2
        return attn + mlp_mats * self.hidden_size * self.intermediate_size

    def num_parameters(self) -> int:
        """Total parameter count, embeddings included once when tied."""
        per_layer = self.linear_params_per_layer() + 2 * self.hidden_size  # + two norms
        if self.attention_bias:
            per_layer += self.q_size + 2 * self.kv_size
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_hidden_layers * per_layer + embed + head + self.hidden_size
