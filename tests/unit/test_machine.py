import os

from training.machine import describe_machine, parse_cpuinfo

X86 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 fma avx512f amx_tile
processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 fma avx512f amx_tile
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes sve
CPU implementer\t: 0x41
"""


def test_parse_cpuinfo_reads_the_first_processors_model_and_flags():
    assert parse_cpuinfo(X86) == ("Intel(R) Xeon(R) Processor", {"fpu", "sse2", "avx2", "fma", "avx512f", "amx_tile"})
    assert parse_cpuinfo(ARM) == ("", {"fp", "asimd", "evtstrm", "aes", "sve"})
    assert parse_cpuinfo("") == ("", set())


def test_describe_machine_names_a_cpu_its_cores_and_the_versions_that_decide_the_arithmetic():
    machine = describe_machine()
    assert machine["cpu"] and machine["cpus"] == os.cpu_count()
    assert "numpy" in machine["versions"]
    assert set(machine["cpu_features"]) <= {
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_bf16",
        "avx_vnni",
        "asimd",
        "sve",
    }
