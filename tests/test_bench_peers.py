"""The pure logic of bench/peers.py: the machine's ISA class from /proc/cpuinfo, and each row's fastest peer."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import (cpu_flags, fastest_peer, fp32_isa, isa_classes, isa_label, row_cells,  # noqa: E402
                         same_run_ratio, table)

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni
processor\t: 1
flags\t\t: fpu
"""
ZEN3 = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse sse2 fma avx avx2 bmi2\n"
SAPPHIRE = "flags\t\t: avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
OLD = "flags\t\t: sse sse2 avx\n"


def test_cpu_flags_reads_the_first_processor():
    flags = cpu_flags(ZEN4)
    assert {"avx2", "fma", "avx512f", "avx512_bf16"} <= flags
    assert "amx_tile" not in flags
    assert cpu_flags("no flags here") == set()


def test_isa_classes():
    assert isa_classes(cpu_flags(ZEN4)) == ["AVX2", "AVX-512", "AVX512-BF16"]
    assert isa_classes(cpu_flags(ZEN3)) == ["AVX2"]
    assert isa_classes(cpu_flags(SAPPHIRE)) == ["AVX2", "AVX-512", "AVX512-BF16", "AMX"]
    assert isa_classes(cpu_flags(OLD)) == []
    assert isa_classes({"avx2"}) == []  # AVX2 without FMA has no fp32 FMA to count


def test_fp32_isa_and_the_cap():
    assert fp32_isa(cpu_flags(ZEN4)) == "avx512"
    assert fp32_isa(cpu_flags(ZEN4), cap="avx2") == "avx2"
    assert fp32_isa(cpu_flags(ZEN3)) == "avx2"
    assert fp32_isa(cpu_flags(OLD)) is None
    assert isa_label(cpu_flags(ZEN4)) == "AVX-512"
    assert isa_label(cpu_flags(ZEN4), cap="avx2") == "AVX2 cap"
    assert isa_label(cpu_flags(ZEN3), cap="avx2") == "AVX2"  # nothing to cap on an AVX2 machine
    assert isa_label(cpu_flags(ZEN3)) == "AVX2"


def test_fastest_peer_leaves_ours_out_and_skips_missing():
    assert fastest_peer({"ours": 1.0, "diffusers": 4.0, "openvino": 3.0, "sdcpp-f16": None}) == ("openvino", 3.0)
    assert fastest_peer({"ours": 1.0}) is None
    assert fastest_peer({"ours": 9.0, "sdcpp-f32": 5.0}) == ("sdcpp-f32", 5.0)
    assert row_cells({"ours": 3.0, "diffusers": 4.0, "openvino": 2.0}) == ["OpenVINO", "1.50"]
    assert row_cells({"ours": None, "diffusers": 4.0}) == ["diffusers", ""]
    assert row_cells({"ours": 3.0}) == ["", ""]


def test_table_rows():
    run = {"tools": {"ours": [4.4, 4.2], "diffusers": [6.7], "openvino": [5.0, 5.6]}, "isa": "AVX-512", "threads": 2,
           "flops": 1.6e12, "command": "python bench/peers.py step --size 512", "date": "d", "load_avg": [1.0, 2.0]}
    assert same_run_ratio([run], {"ours": 4.2, "openvino": 5.0}) == pytest.approx(0.84)
    assert same_run_ratio([run], {"ours": 4.2, "sdcpp-f16": 1.0}) is None  # no run timed both
    machine = {"isa": "AVX-512", "cpu": "AMD EPYC", "cores": 2, "classes": ["AVX2", "AVX-512"], "fp32_isa": "avx512",
               "fma_gflops": {"1": 250.0, "2": 500.0}, "sgemm_tflops": {"oneDNN matmul": 0.49}, "onednn_isa": "x",
               "command": "python bench/peers.py machine", "date": "d"}
    old = {**run, "tools": {"ours": [3.9], "openvino": [3.8]}, "date": "c"}  # an earlier run: replaced by "d"'s
    sdcpp = {**run, "tools": {"ours": [4.3], "sdcpp-f16": [30.0]}, "date": "e"}
    text = table({"machine": {"native": machine}, "step": {"native": {"512": {"x": old, "a": run, "b": sdcpp}}}})
    row = next(line for line in text.splitlines() if line.startswith("| guided step"))
    # each tool from the latest run that timed it (ours: "e"), the ratio within the latest run of ours beside
    # the fastest peer ("d": 4.2 / 5.0)
    assert row == "| guided step (batch 2), 512x512, s | AVX-512 | 4.30 | 6.70 | 5.00 |  | 30.00 | OpenVINO | 0.84 |"
    frac = next(line for line in text.splitlines() if "FMA bound" in line and line.startswith("|"))
    assert "(500 GFLOPS, 1.600 TFLOP a step as the original counts it)" in frac
    assert "| 74% | 48% | 64% |" in frac  # 1.6 TFLOP / 4.3 s / 500 GFLOPS, / 6.7 s, / 5.0 s
    note = next(line for line in text.splitlines() if line.startswith("- AVX-512:"))
    assert "1 thread 250, 2 threads 500 GFLOPS" in note and "oneDNN matmul 490 GFLOPS" in note
