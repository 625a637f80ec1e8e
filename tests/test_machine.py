"""eval/machine.py names the CPU, its vector/matrix features and the versions a benchmark's numbers come from."""
from adore_jax.eval import machine
from adore_jax.eval.report import report_markdown

XEON = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
stepping\t: 8
flags\t\t: sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: another entry that must not be read
flags\t\t: sse2
"""


def test_an_amx_xeon_is_named_with_its_features(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(XEON)
    info = machine.describe(str(path))
    assert info["cpu"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert info["cpu_id"] == "cpu family 6 model 143 stepping 8"
    assert info["features"] == ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                                "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"]
    assert info["versions"]["jax"] and info["backend"] == "cpu"
    line = machine.summary_line(info)
    assert "Platinum 8481C" in line and "amx_bf16" in line and f"jax {info['versions']['jax']}" in line


def test_an_avx2_only_machine_lists_no_avx512(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(XEON.replace(" avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile "
                                 "amx_int8", ""))
    assert machine.describe(str(path))["features"] == ["avx2", "fma"]


def test_without_cpuinfo_the_platform_names_the_cpu(tmp_path):
    info = machine.describe(str(tmp_path / "missing"))
    assert info["cpu"] and info["cpu_id"] == "" and info["features"] == []
    assert "no cpu id" in machine.summary_line(info)


def test_the_xla_flags_in_force_are_recorded(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=false")
    info = machine.describe()
    assert info["xla_flags"] == "--xla_cpu_use_thunk_runtime=false"
    assert "XLA_FLAGS --xla_cpu_use_thunk_runtime=false" in machine.summary_line(info)


def test_the_eval_report_names_its_machine():
    info = machine.describe()
    meta = dict(model="m", started="today", seconds=60, controller=dict(source="embedded", trained=True),
                machine=info)
    assert machine.summary_line(info) in report_markdown(dict(meta=meta))
    old = dict(meta, machine=dict(cpus=2, backend="cpu", jax="0.4"))  # results.json written before the machine line
    assert "machine: 2 CPUs (cpu, jax 0.4)." in report_markdown(dict(meta=old))
