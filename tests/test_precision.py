"""Precision follows the hardware: bf16 where it is native, fp32 elsewhere, with the CPU faked
so that both outcomes are tested on any machine."""

import json

import pytest
from conftest import write_sft

from chatrl import precision
from chatrl.config import LMConfig, load_stage, parse_overrides
from chatrl.errors import UserError
from chatrl.train.lm import train_lm

AVX2_ONLY = {"model name": "AMD EPYC 7B13", "flags": "fpu sse2 avx avx2 fma f16c"}
ZEN4 = {"model name": "AMD EPYC 9B14", "flags": "fpu avx2 fma avx512f avx512_bf16"}
SAPPHIRE_RAPIDS = {"model name": "Intel Xeon", "flags": "avx2 avx512f amx_tile amx_bf16"}
GRAVITON3 = {"Features": "fp asimd sve bf16 i8mm"}


@pytest.fixture
def fake_cpu(monkeypatch):
    """Replace /proc/cpuinfo with the given keys (or none at all), and torch's kernels with the
    ones such a CPU gets, and forget the cached answer."""

    def fake(info: dict[str, str]) -> None:
        flags = info.get("flags", "").split()
        capability = "AVX512" if "avx512f" in flags else "AVX2" if flags else "DEFAULT"
        monkeypatch.setattr(precision, "_cpuinfo", lambda: info)
        monkeypatch.setattr(precision, "_torch_capability", lambda: capability)
        precision.hardware.cache_clear()

    monkeypatch.setattr(precision, "_gpu_hardware", lambda: None)
    yield fake
    precision.hardware.cache_clear()


@pytest.mark.parametrize(
    "info, native, flag",
    [(AVX2_ONLY, False, None), (ZEN4, True, "avx512_bf16"), (SAPPHIRE_RAPIDS, True, "amx_bf16")]
    + [(GRAVITON3, True, "bf16")],
)
def test_bf16_is_native_only_with_bf16_instructions(fake_cpu, info, native, flag):
    fake_cpu(info)
    hw = precision.hardware()
    assert hw.device == "cpu" and hw.bf16_native is native
    assert (flag in hw.reason) if flag else "no bf16 instructions" in hw.reason


def test_avx2_kernels_mean_no_native_bf16_whatever_the_flags(fake_cpu, monkeypatch):
    # ATEN_CPU_CAPABILITY=avx2 on a Zen 4: torch's bf16 then runs through AVX2 code.
    fake_cpu(ZEN4)
    monkeypatch.setattr(precision, "_torch_capability", lambda: "AVX2")
    hw = precision.hardware()
    assert hw.bf16_native is False and "AVX2 kernels" in hw.reason


def test_unreadable_flags_fall_back_to_a_measured_probe(fake_cpu, monkeypatch):
    fake_cpu({})
    monkeypatch.setattr(precision, "bf16_probe", lambda: False)
    assert precision.hardware().bf16_native is False
    assert "measured" in precision.hardware().reason
    precision.hardware.cache_clear()
    monkeypatch.setattr(precision, "bf16_probe", lambda: True)
    assert precision.hardware().bf16_native is True


def test_auto_chooses_by_hardware_and_says_so(fake_cpu, capsys):
    fake_cpu(AVX2_ONLY)
    assert precision.resolve_bf16("auto", "sft") is False
    assert capsys.readouterr().err.startswith("sft: precision fp32 (auto: the CPU (")
    fake_cpu(ZEN4)
    assert precision.resolve_bf16("auto", "sft") is True
    assert "sft: precision bf16 (auto: the CPU has avx512_bf16)" in capsys.readouterr().err


def test_explicit_bf16_without_native_support_runs_after_one_warning(fake_cpu, capsys):
    fake_cpu(AVX2_ONLY)
    assert precision.resolve_bf16(True, "rm") is True
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "rm: precision bf16 (bf16 = true)"
    assert len(err) == 2 and err[1].startswith("warning: rm runs in bf16")
    assert "AMD EPYC 7B13" in err[1] and "slower" in err[1]
    fake_cpu(ZEN4)
    precision.resolve_bf16(True, "rm")
    assert "warning" not in capsys.readouterr().err
    assert precision.resolve_bf16(False, "rm") is False


def test_settings_take_auto_true_and_false():
    base = {"model": "m", "data": "d", "out": "o"}
    assert LMConfig(**base).bf16 == "auto"
    for words, value in [(["--bf16", "auto"], "auto"), (["--bf16", "true"], True)]:
        assert load_stage(LMConfig, None, None, {**base, **parse_overrides(words)}).bf16 == value
    assert (
        load_stage(LMConfig, None, None, {**base, **parse_overrides(["--no-bf16"])}).bf16 is False
    )
    with pytest.raises(UserError, match="'bf16': Value error, 'sometimes': choose auto, true or"):
        load_stage(LMConfig, None, None, {**base, "bf16": "sometimes"})


@pytest.mark.parametrize("info, expected", [(AVX2_ONLY, False), (ZEN4, True)])
def test_a_trainer_saves_the_precision_it_chose(fake_cpu, micro_model, tmp_path, info, expected):
    fake_cpu(info)
    data = write_sft(tmp_path / "sft.jsonl", 16)
    cfg = LMConfig(model=str(micro_model), data=str(data), out=str(tmp_path / "sft"), max_steps=1)
    out = train_lm(cfg, "sft")
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["bf16"] is expected
    assert saved["hardware"]["bf16_native"] is expected
    assert saved["hardware"]["name"] == info["model name"]
