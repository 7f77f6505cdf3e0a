import pytest

from esr.config import Config, ConfigError, load_config


def test_defaults_are_the_papers():
    cfg = Config()
    assert (cfg.rollout.horizon, cfg.rollout.n, cfg.rollout.temperature) == ("esr", 100, 0.7)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.lr, cfg.train.batch_size) == (32, 64, 5e-5, 16)
    assert cfg.student.trust_remote_code is False


def test_dotted_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 5}\nrollout: {horizon: esr}\n")
    cfg = load_config(path, ["train.steps=20", "rollout.horizon=full", "train.lr=1e-4", "data.limit=null"])
    assert cfg.train.steps == 20 and cfg.rollout.horizon == "full"
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.limit is None


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'.*Did you mean 'train.steps'"):
        load_config(None, ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'rollot'.*Did you mean 'rollout'"):
        load_config(None, ["rollot.n=3"])


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"rollout.horizon='ful' is not one of .*Did you mean 'full'"):
        load_config(None, ["rollout.horizon=ful"])
    with pytest.raises(ConfigError, match="train.steps must be an integer"):
        load_config(None, ["train.steps=abc"])
    with pytest.raises(ConfigError, match="student.trust_remote_code must be true or false"):
        load_config(None, ["student.trust_remote_code=maybe"])


def test_contradictions_are_rejected():
    with pytest.raises(ConfigError, match=r"rollout.n=600 is larger than rollout.max_new_tokens=512"):
        load_config(None, ["rollout.n=600"])
    with pytest.raises(ConfigError, match="train.micro_batch_size must be at least 1"):
        load_config(None, ["train.micro_batch_size=0"])
    with pytest.raises(ConfigError, match="loss.beta"):
        load_config(None, ["loss.beta=2"])


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.train.steps = 3  # type: ignore[misc]


def test_yaml_cannot_run_python(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted(Path("configs").rglob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize(("overrides", "message"), [
    (["rollout.engine=vllm-server"], r"needs rollout.vllm.url.*api_server"),
    (["rollout.vllm.url=http://127.0.0.1:8000"], r"rollout.engine=hf: set rollout.engine=vllm-server"),
    (["rollout.engine=vllm-server", "rollout.vllm.url=ftp://x"], r"rollout.vllm.url='ftp://x' is not an http"),
    (["rollout.engine=vllm-server", "rollout.vllm.url=http://u:p@h:1"], r"must not hold credentials"),
    (["rollout.engine=vllm-server", "rollout.vllm.url=http://h:1", "train.finetune=full"],
     r"syncs LoRA adapters.*weight-transfer"),
    (["rollout.engine=vllm", "train.fsdp=true"], r"use rollout.engine=hf with train.fsdp"),
    (["rollout.engine=vllm", "rollout.vllm.kv_cache_gib=0"], r"kv_cache_gib"),
    (["loss.top_k=0"], r"loss.top_k must be at least 1"),
    (["loss.tis_cap=2"], r"corrects the sampled estimator"),
    (["loss.kind=sampled", "loss.tis_cap=2"], r"rollout.engine=hf samples with the trainer's own forward"),
    (["loss.kind=sampled", "rollout.engine=vllm", "loss.tis_cap=0.5"], r"loss.tis_cap must be a finite number >= 1"),
    (["teacher.engine=vllm-server"], r"teacher.engine=vllm-server needs teacher.url"),
    (["teacher.engine=vllm", "teacher.url=http://h:1", "loss.kind=sampled"], r"set teacher.engine=vllm-server"),
])
def test_engine_settings_that_cannot_work_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/smoke.yaml", overrides)


def test_engine_settings_that_work_load():
    cfg = load_config("configs/smoke.yaml", ["rollout.engine=vllm", "rollout.dtype=bfloat16", "loss.kind=sampled",
                                             "loss.tis_cap=2"])
    assert cfg.rollout.engine == "vllm" and cfg.rollout.dtype == "bfloat16" and cfg.loss.tis_cap == 2.0
    server = load_config("configs/smoke.yaml", ["rollout.engine=vllm-server", "rollout.vllm.url=http://h:8000"])
    assert server.rollout.vllm.url == "http://h:8000"
