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
    "deepseek_v3": dict(moe=True, qkv_bias=False, qk_norm=False),
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
    # DeepSeek-V3 routing: sigmoid scores, top-k within the `topk_group` best of `n_group` expert
    # groups (each group scored by its two best experts), weights times `routed_scaling_factor`;
    # the shared expert (`shared_expert_gated=False`) is added without a gate. The
    # `e_score_correction_bias` is our `expert_bias` buffer, always present for this family.
    scoring_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    shared_expert_gated: bool = True
    # Multi-head latent attention (DeepSeek-V2/V3), on when kv_lora_rank > 0. q_lora_rank 0: a plain
    # q projection. head_dim is then the rotary part (qk_rope_head_dim), as in transformers.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    # Multi-token-prediction layers the checkpoint carries (DeepSeek-V3's num_nextn_predict_layers).
    num_mtp_layers: int = 0
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

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def rope_attention_factor(self) -> float:
        """YaRN's scale of the rotary cos/sin tables (transformers' `attention_scaling`); 1 otherwise."""
        if self.rope_type != "yarn":
            return 1.0
        s = self.rope_scaling
        if s.get("attention_factor") is not None:
            return float(s["attention_factor"])
        if s.get("mscale") and s.get("mscale_all_dim"):
            return _yarn_mscale(s["factor"], s["mscale"]) / _yarn_mscale(s["factor"], s["mscale_all_dim"])
        return _yarn_mscale(s["factor"])

    def attention_scale(self, qk_head_dim: int) -> float:
        """The softmax scale: 1/sqrt(qk head dim), times YaRN's mscale(factor, mscale_all_dim)^2 for
        MLA models (transformers' `yarn_apply_mscale`, DeepSeek's reference)."""
        scale = qk_head_dim ** -0.5
        if self.is_mla and self.rope_type == "yarn" and self.rope_scaling.get("mscale_all_dim"):
            m = _yarn_mscale(self.rope_scaling["factor"], self.rope_scaling["mscale_all_dim"])
            scale = scale * m * m
        return scale

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
        elif self.rope_type == "yarn":
            return self._yarn_inv_freq()
        return inv.float()

    def _yarn_inv_freq(self) -> "torch.Tensor":  # noqa: F821
        """YaRN frequencies, computed in fp32 in the order transformers' `_compute_yarn_parameters` does."""
        import torch

        s, dim, base = self.rope_scaling, self.head_dim, self.rope_theta
        factor, old_ctx = s["factor"], s["original_max_position_embeddings"]
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
        extrapolation = 1 - ramp
        return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation

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
        if model_type == "deepseek_v3":
            head_dim = need("qk_rope_head_dim")  # the rotary part; the MLA dims are read below
        max_pos = hf.get("max_position_embeddings", 4096)

        # Sliding window: exact only if no sequence is longer than the window, so the window
        # becomes the context limit instead of being ignored.
        window = None
        if model_type == "mistral" or hf.get("use_sliding_window"):
            window = hf.get("sliding_window") or None
        max_context = min(max_pos, window) if window else max_pos

        rope, theta, scaling = _rope(hf)
        if rope == "yarn" and model_type != "deepseek_v3":
            raise ValueError(f"rope_type 'yarn' is supported for deepseek_v3 only (verified against transformers "
                             f"there), not for model_type {model_type!r}")
        if rope == "yarn" and scaling.get("factor") is None:  # DeepSeek: the ratio of the contexts
            scaling["factor"] = max_pos / scaling["original_max_position_embeddings"]

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
            n_exp = hf.get("num_experts") or hf.get("num_local_experts") or hf.get("n_routed_experts")
            if not n_exp:
                raise ValueError(f"MoE model_type {model_type!r} needs num_experts / num_local_experts")
            step = hf.get("decoder_sparse_step", 1) or 1
            dense = set(hf.get("mlp_only_layers") or [])
            if model_type == "deepseek_v3":
                dense = set(range(hf.get("first_k_dense_replace") or 0))
                n_exp = hf.get("n_routed_experts") or n_exp
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
        if model_type == "deepseek_v3":
            kw.update(_deepseek_v3_fields(hf, need))
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
            config = cls.from_hf_dict(hf)
        except KeyError as e:  # a field another one needs (e.g. rope scaling's "factor")
            raise InputError(f"{cfg_path}: missing field {e.args[0]!r}") from None
        except (ValueError, TypeError, ArithmeticError) as e:  # unsupported or ill-typed fields
            raise InputError(f"{cfg_path}: {e}") from None
        if config.num_mtp_layers:
            # transformers writes num_nextn_predict_layers=1 for every deepseek_v3 it saves, MTP weights
            # or not: the layers exist only if the checkpoint holds them.
            from rl_engine.policy.checkpoint import checkpoint_tensor_names

            first = f"model.layers.{config.num_layers}."
            try:
                names = checkpoint_tensor_names(path)
            except InputError:  # no weights files: loading them will say so
                return config
            if not any(name.startswith(first) for name in names):
                config = config.replace(num_mtp_layers=0)
        return config

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                             f"[1, num_experts={self.num_experts}]")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func {self.scoring_func!r} is not supported; use 'softmax' or 'sigmoid'")
        if self.is_moe and (self.n_group < 1 or self.num_experts % self.n_group):
            raise ValueError(f"n_group ({self.n_group}) must divide n_routed_experts ({self.num_experts})")
        if self.is_moe and not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be in [1, n_group={self.n_group}]")
        if self.is_moe and self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise ValueError(f"each of the n_group ({self.n_group}) expert groups needs >= 2 experts "
                             f"(groups are scored by their two best); n_routed_experts is {self.num_experts}")
        if self.is_moe and self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts of the "
                             f"topk_group ({self.topk_group}) groups a token may use")
        if self.is_mla and not (self.qk_nope_head_dim > 0 and self.v_head_dim > 0):
            raise ValueError("multi-head latent attention needs qk_nope_head_dim > 0 and v_head_dim > 0, got "
                             f"{self.qk_nope_head_dim} and {self.v_head_dim}")

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
        if self.model_type == "deepseek_v3":
            for key in ("num_experts", "num_local_experts", "shared_expert_intermediate_size", "head_dim"):
                d.pop(key, None)
            d.update(self._deepseek_v3_hf_fields())
        return d

    def _deepseek_v3_hf_fields(self) -> dict[str, Any]:
        if self.shared_expert_intermediate_size % max(self.moe_intermediate_size, 1):
            raise ValueError(f"deepseek_v3 export: shared_expert_intermediate_size ({self.shared_expert_intermediate_size})"
                             f" must be n_shared_experts x moe_intermediate_size ({self.moe_intermediate_size})")
        d = dict(n_routed_experts=self.num_experts, n_shared_experts=self.shared_expert_intermediate_size
                 // self.moe_intermediate_size, routed_scaling_factor=self.routed_scaling_factor,
                 n_group=self.n_group, topk_group=self.topk_group, kv_lora_rank=self.kv_lora_rank,
                 q_lora_rank=self.q_lora_rank or None, qk_nope_head_dim=self.qk_nope_head_dim,
                 qk_rope_head_dim=self.head_dim, v_head_dim=self.v_head_dim, rope_interleave=self.rope_interleave,
                 first_k_dense_replace=min(self.moe_layers, default=self.num_layers),
                 num_nextn_predict_layers=self.num_mtp_layers, topk_method="noaux_tc", scoring_func="sigmoid")
        if self.moe_layers != list(range(d["first_k_dense_replace"], self.num_layers)):
            raise ValueError(f"deepseek_v3 export: the MoE layers {self.moe_layers} must be the last ones "
                             "(first_k_dense_replace)")
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
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _deepseek_v3_fields(hf: dict[str, Any], need) -> dict[str, Any]:
    """The MLA, routing and MTP fields of a `deepseek_v3` config.json."""
    if hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError(f"topk_method {hf['topk_method']!r} is not supported; only 'noaux_tc' (DeepSeek-V3)")
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"scoring_func {hf['scoring_func']!r} is not supported for deepseek_v3; only 'sigmoid'")
    if hf.get("attention_bias"):
        raise ValueError("attention_bias=true is not supported for deepseek_v3")
    n_shared = hf.get("n_shared_experts") or 0
    return dict(
        num_kv_heads=need("num_attention_heads"),  # MLA has no KV heads; transformers' default (128) means nothing
        kv_lora_rank=need("kv_lora_rank"),
        q_lora_rank=hf.get("q_lora_rank") or 0,
        qk_nope_head_dim=need("qk_nope_head_dim"),
        v_head_dim=need("v_head_dim"),
        rope_interleave=bool(hf.get("rope_interleave", True)),
        scoring_func="sigmoid",
        n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        shared_expert_intermediate_size=n_shared * (hf.get("moe_intermediate_size") or 0),
        shared_expert_gated=False,
        num_mtp_layers=hf.get("num_nextn_predict_layers") or 0,
    )


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
    if rope_type == "yarn":
        if "original_max_position_embeddings" not in merged:
            raise ValueError("rope_type 'yarn' needs 'original_max_position_embeddings' in the rope parameters")
        keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                "attention_factor", "truncate")
        return "yarn", float(theta), {k: merged[k] for k in keys if k in merged}
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, linear, llama3, yarn")
