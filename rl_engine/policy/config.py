"""The model config: one typed dataclass read from a Hugging Face `config.json`.

Every field that changes the math is read explicitly. A field we do not implement (an unknown
`rope_type`, an activation other than SiLU, a sliding window shorter than the context) is refused by
name, never ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

# model_type -> family traits. One table instead of a subclass per family.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(moe=False, qkv_bias=None, qk_norm=False),
    "mistral": dict(moe=False, qkv_bias=False, qk_norm=False),
    "qwen2": dict(moe=False, qkv_bias=True, qk_norm=False),
    "qwen3": dict(moe=False, qkv_bias=None, qk_norm=True),
    "qwen2_moe": dict(moe=True, qkv_bias=True, qk_norm=False),
    "qwen3_moe": dict(moe=True, qkv_bias=None, qk_norm=True),
    "mixtral": dict(moe=True, qkv_bias=False, qk_norm=False),
}


@dataclass(kw_only=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Llama-3 style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; or {"factor"} for linear scaling.
    rope_scaling: dict[str, float] | None = None
    rope_type: str = "default"
    max_position_embeddings: int = 4096
    max_context_len: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    # MoE (num_experts == 0 means dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    moe_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.0
    # Training-only router knobs (not in HF configs): z-loss coefficient and the aux-loss-free
    # balancing bias update rate (0 = no bias).
    router_z_loss_coef: float = 0.0
    router_bias_update_rate: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    # The original config.json, kept so that export writes back what was read.
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def inv_freq(self) -> "torch.Tensor":  # noqa: F821
        import torch

        inv = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        if self.rope_type == "llama3":
            s = self.rope_scaling
            factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
            old_ctx = s["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_ctx / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = torch.where(is_medium, smoothed, scaled)
        elif self.rope_type == "linear":
            inv = inv / self.rope_scaling["factor"]
        return inv.float()

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
            )
        fam = FAMILIES[model_type]

        def need(key: str) -> Any:
            if key not in hf:
                raise ValueError(f"config.json of model_type {model_type!r} lacks required field {key!r}")
            return hf[key]

        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported (only 'silu' / SwiGLU)")
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported; only bias-free MLPs")
        if hf.get("attention_dropout", 0.0) not in (0, 0.0, None):
            raise ValueError("attention_dropout must be 0 for RL training (got "
                             f"{hf['attention_dropout']}); set it to 0.0 in config.json")
        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        head_dim = hf.get("head_dim") or hidden // heads
        max_pos = hf.get("max_position_embeddings", 4096)

        # Sliding window: exact only if no sequence is longer than the window, so the window
        # becomes the context limit instead of being ignored.
        window = None
        if model_type == "mistral" or hf.get("use_sliding_window"):
            window = hf.get("sliding_window") or None
        max_context = min(max_pos, window) if window else max_pos

        rope, theta, scaling = _rope(hf)

        if fam["qkv_bias"] is None:
            qkv_bias = bool(hf.get("attention_bias", False))
        else:
            qkv_bias = fam["qkv_bias"] if model_type != "qwen2_moe" else bool(hf.get("qkv_bias", True))

        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

        kw: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=hf.get("intermediate_size", 0),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_type=rope,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            max_context_len=max_context,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=fam["qk_norm"],
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos_ids,
            hf_config=dict(hf),
        )
        if fam["moe"]:
            n_exp = hf.get("num_experts") or hf.get("num_local_experts")
            if not n_exp:
                raise ValueError(f"MoE model_type {model_type!r} needs num_experts / num_local_experts")
            step = hf.get("decoder_sparse_step", 1) or 1
            dense = set(hf.get("mlp_only_layers") or [])
            kw.update(
                num_experts=n_exp,
                num_experts_per_tok=need("num_experts_per_tok"),
                moe_intermediate_size=hf.get("moe_intermediate_size") or hf.get("intermediate_size"),
                norm_topk_prob=True if model_type == "mixtral" else bool(hf.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0)
                if model_type == "qwen2_moe" else 0,
                moe_layers=[i for i in range(kw["num_layers"]) if i not in dense and (i + 1) % step == 0],
                router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.0),
            )
        if hf.get("router_jitter_noise"):
            raise ValueError("router_jitter_noise is not supported (got "
                             f"{hf['router_jitter_noise']}); set it to 0.0")
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        """The config.json of a model directory. A missing directory or file, or one we cannot use, is
        an `InputError` naming it (the CLI prints it as one line)."""
        from rl_engine.config import InputError, parse_json  # the project's error for a user's bad input

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise InputError(f"model directory {path!r} " + ("is not a directory" if os.path.exists(path)
                                                             else "does not exist"))
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise InputError(f"no config.json in {path!r}: expected a Hugging Face model directory")
        try:
            with open(cfg_path, "rb") as f:
                hf = parse_json(f.read(), cfg_path)
        except OSError as e:
            raise InputError(f"{cfg_path}: cannot be read ({e.strerror or e})") from None
        if not isinstance(hf, dict):
            raise InputError(f"{cfg_path}: expected a JSON object, got {type(hf).__name__}")
        try:
            return cls.from_hf_dict(hf)
        except KeyError as e:  # a field another one needs (e.g. rope scaling's "factor")
            raise InputError(f"{cfg_path}: missing field {e.args[0]!r}") from None
        except (ValueError, TypeError, ArithmeticError) as e:  # unsupported or ill-typed fields
            raise InputError(f"{cfg_path}: {e}") from None

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                             f"[1, num_experts={self.num_experts}]")

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json to write on export: what was read, or one built from our fields."""
        if self.hf_config:
            return dict(self.hf_config)
        d = {
            "model_type": self.model_type,
            "architectures": [ARCHITECTURES[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.model_type in ("llama", "qwen3", "qwen3_moe"):
            d["attention_bias"] = self.qkv_bias
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id:
            d["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id
        if self.is_moe:
            d.update(num_experts=self.num_experts, num_local_experts=self.num_experts,
                     num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size,
                     norm_topk_prob=self.norm_topk_prob,
                     router_aux_loss_coef=self.router_aux_loss_coef)
            if self.shared_expert_intermediate_size:
                d["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
        return d

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


def _rope(hf: dict[str, Any]) -> tuple[str, float, dict[str, float] | None]:
    """(rope_type, theta, scaling) from either transformers-4 (`rope_theta` + `rope_scaling`) or
    transformers-5 (`rope_parameters`) style configs."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return "default", float(theta), None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in merged]
        if missing:
            raise ValueError(f"llama3 rope scaling lacks {missing}")
        return "llama3", float(theta), {k: float(merged[k]) for k in keys}
    if rope_type == "linear":
        return "linear", float(theta), {"factor": float(merged["factor"])}
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, linear, llama3")
