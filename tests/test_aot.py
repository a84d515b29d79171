"""The compile gate (``python -m fusedres.aot``): every shipped kernel config compiles for every
listed arch (sm_80, sm_86, sm_89, sm_90, sm_120) without spills, within that arch's shared memory
and registers, on tensor cores (wgmma, unserialised, on sm_90; mma.sync elsewhere); and the gate
itself fails on configs that are broken. sm_80 and sm_90 compile the full product here, the 99 KB
archs the covering set (every config shipped for them, each in its heaviest variant).

The gate cannot run in this process: conftest.py sets TRITON_INTERPRET=1 on a CPU-only machine,
and the interpreter replaces the JIT functions. So every compile runs in a subprocess whose
environment lacks TRITON_INTERPRET.
"""
import copy
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fusedres
from fusedres import activations, aot, kernels
from fusedres.kernels import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(interpret: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _run(args, *, interpret=False, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(interpret), capture_output=True, text=True,
                          timeout=timeout)


def _key(r):
    return (r["kernel"], json.dumps(r["config"], sort_keys=True), r["variant"], r["arch"], r["two_level"],
            r["features"], r["width"])


def _operand_sizes(kind, dtype, features="base"):
    """(GEMM, (A, B)) element sizes of a launch, from the dtypes alone: the activations (x, g) are
    fp32 under autocast, the weights in the GEMM dtype; the MLP block's dW2 reads the hidden
    tensor, which is in the GEMM dtype, as its x."""
    w = aot.DTYPES[dtype][0].itemsize
    act = aot.ACTIVATIONS.get(dtype, aot.DTYPES[dtype][0]).itemsize
    if kind == "dw" and features == "mlp":
        return w, (w, act)
    return w, {"fwd": (act, w), "dx": (act, w), "dw": (act, act)}[kind]


#: The archs the gate tests compile the full product for; the others of the default list get the
#: covering set (``--cover``).
FULL_ARCHS = ("sm_80", "sm_90")
COVER_ARCHS = tuple(a for a in aot.DEFAULT_ARCHS if a not in FULL_ARCHS)
#: Each arch's tensor-core instruction and opt-in shared memory per block
TENSOR_CORE = {"sm_80": "mma.sync", "sm_86": "mma.sync", "sm_89": "mma.sync", "sm_90": "wgmma.mma_async",
               "sm_120": "mma.sync"}
SHARED_LIMIT = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448, "sm_120": 101376}


def _shipped(kind, dtype, tl_, feats, arch):
    return configs.shipped_configs(kind, *_operand_sizes(kind, dtype)[:1], tl_, _operand_sizes(kind, dtype, feats)[1],
                                   proj=feats in ("alpha+proj", "split+alpha+proj"),
                                   row_scale=feats in ("drop-path", "mlp", "split+drop-path", "layerscale",
                                                       "split+layerscale"),
                                   limits=aot.arch_limits(arch), channel_alpha=feats.split("@")[0] == "layerscale")


def _expected(dtypes, two_level, features, archs=FULL_ARCHS):
    """Every (kernel, config, dtype, arch, layout, variant) the gate must cover, from the shipped lists."""
    from fusedres.kernels import plan
    jobs = {
        (kind, json.dumps(aot.config_dict(c), sort_keys=True), dtype, arch, tl_, feats, None)
        for kind in aot.KINDS
        for dtype in dtypes
        for tl_ in two_level
        for feats in features if kind == "dw" or feats not in aot.SPLIT_FEATURES
        for arch in archs
        for c in _shipped(kind, dtype, tl_, feats, arch)
    }
    # each split variant also compiles the reduce (it reads no rows), once per dtype and arch
    return jobs | {(aot.REDUCE_KIND, json.dumps(aot.config_dict(c), sort_keys=True), dtype, arch, False, feats, None)
                   for dtype in dtypes for feats in features if feats in aot.SPLIT_FEATURES for arch in archs
                   for c in plan.reduce_configs(aot.DTYPES[dtype][0].itemsize, aot.arch_limits(arch))}


def _expected_cover(dtypes, features, archs=COVER_ARCHS):
    """The covering set, as (kernel, config, dtype, arch) without the variant: every config shipped for
    each kernel, dtype and arch in any variant, the reduce's, and every stack kernel at every width."""
    full = _expected(dtypes, (False,), features, archs) | _expected_stack(dtypes, archs, cover=True)
    return {(k, c, d, a, w) for k, c, d, a, _, _, w in full}


def _expected_stack(dtypes, archs=FULL_ARCHS, cover=False):
    """Every (stack kernel, config, dtype, arch, variant, width): one shipped config per width and arch."""
    out = set()
    for kind in aot.STACK_KINDS:
        for dtype in dtypes:
            if kind == "stack_reduce" and dtype in aot.ACTIVATIONS:
                continue
            tdtype, precision = aot.DTYPES[dtype]
            with aot._matmul_precision(precision):
                operands = configs.stack_operand_class(tdtype, aot.ACTIVATIONS.get(dtype))
            for arch in archs:
                for width in (16, 32, 64, 128):
                    c = configs.stack_config(kind, width, operands, limits=aot.arch_limits(arch))
                    for variant in (aot.STACK_COVER if cover else aot.STACK_VARIANTS)[kind]:
                        out.add((kind, json.dumps(aot.config_dict(c), sort_keys=True), dtype, arch, False, variant,
                                 width))
    return out


#: The default gate (contiguous rows, every dtype, both kernel variants: base, and residual scale
#: with projection; and every stack kernel at every width in each of its variants) plus two-level
#: rows for the single-block fp32 variants and fp16 with a projection, which have their own lists.
#: ``python -m fusedres.aot --two-level both`` covers every layout x dtype.
#: The autocast variants (fp32 activations, 16-bit GEMMs) are in the default gate, not in this run:
#: they would add about 240 compiles to CI; test_autocast_variant_compiles samples them.
#: 16-bit two-level rows have their own list too (a projection spills 128x64x64 at 4 warps on sm_80):
#: fp16 with the projection checks it.
#: fp16 split-M with two-level rows: 64x128x64 at 4 warps spilled 12 B there on sm_80 (triton 3.7.1)
#: before it was dropped.
#: Every variant but dW's split ones (the covering set on the 99 KB archs and the fp16 two-level
#: run compile those). layerscale is here because in a covering set its per-channel forward and dW
#: epilogues never compile: alpha+proj, heavier, takes every config they ship.
FULL_FEATURES = aot.FEATURES
RUNS = [(tuple(d for d in aot.DEFAULT_DTYPES if d not in aot.ACTIVATIONS), (False,), FULL_FEATURES),
        (("fp32", "tf32"), (True,), ("base",)),
        (("fp16",), (True,), ("alpha+proj", "split"))]
#: The covering set on the 99 KB archs, every default dtype but autocast-fp16 (autocast-bf16's fp32
#: tiles are what overflows 99 KB; the two mixes ship the same lists and have compiled alike on every
#: release and arch so far), every variant.
COVER_RUN = (tuple(d for d in aot.DEFAULT_DTYPES if d != "autocast-fp16"), aot.DEFAULT_FEATURES)


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    """The gate run once per entry of RUNS: all kernels x shipped configs x dtypes x (sm_80, sm_90)."""
    runs = []
    for i, (dtypes, two_level, features) in enumerate(RUNS):
        path = tmp_path_factory.mktemp("aot") / f"gate{i}.json"
        stack = two_level == (False,)     # the stack kernels take contiguous rows only
        kinds = aot.ALL_KINDS if stack else aot.KINDS
        proc = _run(["-m", "fusedres.aot", "-q", "-j", str(os.cpu_count() or 2), "--dtypes", ",".join(dtypes),
                     "--two-level", "yes" if two_level == (True,) else "no", "--features", ",".join(features),
                     "--kernels", ",".join(kinds), "--archs", ",".join(FULL_ARCHS), "--json", str(path)])
        runs.append((proc, json.loads(path.read_text()) if path.exists() else None,
                     _expected(dtypes, two_level, features) | (_expected_stack(dtypes) if stack else set())))
    return runs


@pytest.fixture(scope="module")
def cover_gate(tmp_path_factory):
    """The covering set on the 99 KB archs (sm_86, sm_89, sm_120)."""
    dtypes, features = COVER_RUN
    path = tmp_path_factory.mktemp("aot") / "cover.json"
    proc = _run(["-m", "fusedres.aot", "-q", "--cover", "-j", str(os.cpu_count() or 2), "--dtypes", ",".join(dtypes),
                 "--features", ",".join(features), "--archs", ",".join(COVER_ARCHS), "--json", str(path)])
    return proc, json.loads(path.read_text()) if path.exists() else None, _expected_cover(dtypes, features)


def test_gate_passes_every_shipped_config(gate):
    assert set(FULL_ARCHS) | set(COVER_ARCHS) == set(aot.DEFAULT_ARCHS) == set(TENSOR_CORE)
    assert {"fp16", "bf16", "fp32"} <= set(aot.DEFAULT_DTYPES)
    for proc, records, expected in gate:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        got = [_key(r) for r in records]
        assert len(got) == len(set(got)) and set(got) == expected
        for r in records:
            _check_record(r)


def test_covering_set_passes_on_the_99kb_archs(cover_gate):
    """Every config shipped for sm_86, sm_89 and sm_120 (chosen under their 101,376 B) compiles clean
    there, once each: the set of (kernel, config, dtype, arch, width) is exactly the shipped one."""
    proc, records, expected = cover_gate
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    got = [(r["kernel"], json.dumps(r["config"], sort_keys=True), r["variant"], r["arch"], r["width"])
           for r in records]
    assert len(got) == len(set(got)) and set(got) == expected
    for r in records:
        _check_record(r)
    # the 99 KB lists are shorter: 16-bit 128x128x64 at 4 stages (114,688 B of pipeline) is not shipped there
    names = {r["config_name"] for r in records if r["kernel"] == "fwd" and r["variant"] == "bf16"}
    assert "128x128x64 w8 s3" in names and "128x128x64 w8 s4" not in names


def _check_record(r):
    where = f"{r['kernel']} {r['arch']} {r['variant']} {r['config_name']} two_level={r['two_level']}"
    assert r["ok"] and not r["failures"] and r["error"] is None, where
    assert r["spill_bytes"] == 0 and r["local_bytes"] == 0, where
    assert 0 < r["registers"] <= 255, where
    # (the reduces, the stack's and split-M dW's, are pure streaming sums: no shared memory)
    assert (0 if r["kernel"] in ("stack_reduce", aot.REDUCE_KIND) else 1) <= r["shared_bytes"] <= r["shared_limit"], \
        where
    assert r["shared_limit"] == SHARED_LIMIT[r["arch"]]
    assert r["registers"] * r["config"]["num_warps"] * 32 <= 65536, where
    assert not any("C75" in a for a in r["advisories"]), where
    if r["kernel"] in aot.STACK_KINDS:
        _check_stack_record(r, where)
        return
    if r["kernel"] == aot.REDUCE_KIND:          # a streaming sum of the split-M slabs: no GEMM, no rows
        assert r["tensor_core_expected"] is None, where
        return
    if r["variant"] == "fp32" and r["input_precision"] == "ieee":
        # torch's default matmul precision 'highest': IEEE fp32 on CUDA cores, no tensor core
        assert r["tensor_core_expected"] is None, where
    else:
        want = TENSOR_CORE[r["arch"]]
        assert r["tensor_core"] and r["tensor_core_instr"] == want == r["tensor_core_expected"], where
    # the signature was specialised as a real launch specialises it
    assert "x_ptr" in r["divisible_by_16"], where
    assert any(n.startswith("stride_") for n in r["equal_to_1"]), where


def _check_stack_record(r, where):
    """The stack kernels: tensor cores in both GEMM kernels (none expected in the reduce, nor for
    IEEE fp32), 128-bit global loads and no 16-bit scalar ones, and only relaxed atomics, which
    appear in the backward's atomic variant only; the operands compiled as 16-byte aligned."""
    where += f" D={r['width']} {r['features']}"
    ieee = r["variant"] == "fp32" and r["input_precision"] == "ieee"
    if r["kernel"] == "stack_reduce" or ieee:
        assert r["tensor_core_expected"] is None, where
    else:
        want = TENSOR_CORE[r["arch"]]
        assert r["tensor_core"] and r["tensor_core_instr"] == want == r["tensor_core_expected"], where
    assert r["vector_loads"] > 0 and r["scalar_loads"] == 0, where
    assert r["non_relaxed_atomics"] == [], where
    assert (r["atomics"] > 0) == (r["features"] == "atomic"), where
    first = {"stack_fwd": "x_ptr", "stack_bwd": "g_ptr", "stack_reduce": "ws_ptr"}[r["kernel"]]
    assert first in r["divisible_by_16"], where


def test_gate_derives_the_launch_specialisation(gate):
    _, records, _ = gate[0]
    fwd = next(r for r in records if r["kernel"] == "fwd")
    # pointers, sizes and row strides are 16-divisible at M=8192, D=1024; unit strides are constexpr 1
    assert {"x_ptr", "w_ptr", "y_ptr", "M", "stride_xm"} <= set(fwd["divisible_by_16"])
    assert {"stride_xk", "stride_wk", "stride_yn"} <= set(fwd["equal_to_1"])
    tf32 = {r["input_precision"] for r in records if r["variant"] == "tf32"}
    assert tf32 == {"tf32"}
    _, two_level, _ = gate[1]
    assert all(r["two_level"] for r in two_level)
    assert "stride_xo" in next(r for r in two_level if r["kernel"] == "fwd")["divisible_by_16"]


_BROKEN = textwrap.dedent('''
    import inspect, json, re, sys, tempfile, importlib.util
    from fusedres import aot
    from fusedres.kernels.residual_fwd import residual_fwd_kernel

    out = {}
    # tl.dot with K < 16: the interpreter runs it, the compiler refuses it
    out["k8"] = aot.compile_config("fwd", aot.config_from_name("fwd", "64x64x8 w4 s3"), "fp16", "sm_80")
    # an 8-stage pipeline of 64x128 and 128x64 fp16 tiles: 240 KB of shared memory
    out["smem"] = aot.compile_config("fwd", aot.config_from_name("fwd", "64x64x128 w4 s8"), "fp16", "sm_90")
    # the forward without the K-loop bound tl.maximum(cdiv(K, BLOCK_K), 1): wgmma serialised (C7515)
    src, n = re.subn(r"tl\\.maximum\\(tl\\.cdiv\\(K, BLOCK_K\\), 1\\)", "tl.cdiv(K, BLOCK_K)",
                     inspect.getsource(residual_fwd_kernel.fn))
    assert n >= 1, "the forward kernel's K loop changed; update this test"
    mod = tempfile.NamedTemporaryFile("w", suffix="_fwd_c7515.py", delete=False)
    mod.write("import triton\\nimport triton.language as tl\\nfrom fusedres.kernels._common import *\\n"
              "from fusedres.kernels.gemm import *\\n" + src)
    mod.close()
    spec = importlib.util.spec_from_file_location("fwd_c7515", mod.name)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    out["c7515"] = aot.compile_config("fwd", aot.config_from_name("fwd", "128x128x64 w8 s3"), "fp16", "sm_90",
                                      kernel=m.residual_fwd_kernel)
    # the stack's forward without the wrapper's 16-byte alignment: no vector loads of x
    cfg = aot.stack_gate_config("stack_fwd", 64, "sm_90", "bf16")
    out["misaligned"] = aot.compile_config("stack_fwd", cfg, "bf16", "sm_90", features="train", width=64,
                                           misaligned=True)
    json.dump(out, sys.stdout)
''')


def test_gate_fails_broken_configs():
    proc = _run(["-c", _BROKEN], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert not out["k8"]["ok"] and out["k8"]["failures"] == ["compile error"]
    assert "K >= 16" in out["k8"]["error"]
    smem = out["smem"]
    assert not smem["ok"] and smem["error"] is None and smem["shared_bytes"] > smem["shared_limit"] == 232448
    assert any(f.startswith("shared memory") for f in smem["failures"])
    c7515 = out["c7515"]
    assert not c7515["ok"] and c7515["tensor_core_instr"] == "wgmma.mma_async" and c7515["spill_bytes"] == 0
    assert any("C7515" in a for a in c7515["advisories"])
    assert any("C7515" in f for f in c7515["failures"])
    misaligned = out["misaligned"]
    assert not misaligned["ok"] and "x_ptr" not in misaligned["divisible_by_16"]
    assert misaligned["scalar_loads"] > 0 and any("scalar 16-bit" in f for f in misaligned["failures"])


def test_memory_instruction_scan():
    ptx = "\n".join([
        "\t@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
        "\tld.global.b16 { %rs1 }, [ %rd2 + 0 ];",
        "\tld.global.b32 { %r5 }, [ %rd3 + 0 ];",
        "\tcp.async.cg.shared.global [ %r6 + 0 ], [ %rd4 + 0 ], 0x10, %r7;",
        "\t@%p2 red.global.gpu.relaxed.add.f32 [ %rd5 + 0 ], %r8;",
        "\tatom.global.gpu.acq_rel.add.f32 %r9, [ %rd6 + 0 ], %r10;",
    ])
    got = aot.memory_instructions(ptx)
    assert got == dict(vector_loads=2, scalar_loads=1, atomics=2,
                       non_relaxed_atomics=["atom.global.gpu.acq_rel.add.f32"])


def test_cli_exits_nonzero_on_a_broken_config_and_reexecs_without_interpreter(tmp_path):
    path = tmp_path / "broken.json"
    proc = _run(["-m", "fusedres.aot", "--kernels", "dx", "--dtypes", "bf16", "--archs", "sm_80",
                 "--features", "base", "--config", "64x64x8 w4 s3", "--json", str(path)], interpret=True,
                timeout=600)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "re-running without it" in proc.stderr
    (rec,) = json.loads(path.read_text())
    assert rec["kernel"] == "dx" and rec["arch"] == "sm_80" and rec["dtype"] == "bf16" and not rec["ok"]
    assert "FAIL dx sm_80 bf16 64x64x8 w4 s3 (base): compile error" in proc.stdout


def test_refuses_to_compile_in_an_interpreted_process():
    assert os.environ.get("TRITON_INTERPRET") == "1" or not aot.kernels.INTERPRET
    if aot.kernels.INTERPRET:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            aot.compile_config("fwd", configs.shipped_configs("fwd", 2)[0], "fp16", "sm_90")


def test_ptxas_log_parsing():
    log = textwrap.dedent("""\
        ptxas-blackwell info    : 0 bytes gmem
        ptxas-blackwell info    : Compiling entry function 'k' for 'sm_90a'
        ptxas-blackwell info    : Function properties for k
            40 bytes stack frame, 36 bytes spill stores, 36 bytes spill loads
        ptxas-blackwell info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized
        ptxas-blackwell info    : Used 255 registers, used 1 barriers, 40 bytes cumulative stack size
        ptxas-blackwell info    : Compile time = 271.792 ms
        """)
    stores, loads, stack, advisories = aot.parse_ptxas_log(log)
    assert (stores, loads, stack) == (36, 36, 40)
    assert advisories == ["info: (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized"]
    rec = dict(error=None, spill_bytes=72, local_bytes=40, shared_bytes=1, shared_limit=2,
               tensor_core_expected="wgmma.mma_async", tensor_core=True, advisories=advisories)
    fails = aot.failures(rec)
    assert fails[0] == "spills 72 B" and "C7515" in fails[1] and len(fails) == 2
    # registers times threads over the 65536 a block holds: 255 registers at 16 warps
    heavy = dict(rec, spill_bytes=0, local_bytes=0, advisories=[], registers=255, config={"num_warps": 16})
    assert aot.failures(heavy) == ["registers 255 x 512 threads > 65536"]
    assert aot.failures(dict(heavy, registers=128)) == []


_TTIR = textwrap.dedent('''
    import json, sys
    from fusedres import aot
    from fusedres.kernels import configs
    out = {}
    for kind in aot.KINDS:
        for features in aot.FEATURES:
            for two_level in (False, True):
                dtype = "fp32" if two_level else "bf16"
                cfg = configs.shipped_configs(kind, 4 if two_level else 2, two_level)[0]
                r = aot.compile_config(kind, cfg, dtype, "sm_90", two_level=two_level, features=features,
                                       keep_ir=True)
                out[f"{kind} {features} {two_level}"] = r["ttir"]
    json.dump(out, sys.stdout)
''')


def test_row_offsets_are_64_bit_in_the_compiled_kernels():
    """int64 safety, compile side: in the TTIR the GPU compiler gets, every pointer step along the
    long (row) dimension of a tile, the ``[R, 1]`` or ``[1, R]`` row bases of x, g, y, dx and of
    the weight rows, is a 64-bit offset; only the in-row column offsets (k * stride, bounded by
    one row) are 32-bit. So ``M * D >= 2**31`` cannot overflow an address."""
    import re
    proc = _run(["-c", _TTIR], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, ttir in json.loads(proc.stdout).items():
        row_steps = re.findall(r"tt\.addptr .*: tensor<(\d+)x(\d+)x!tt\.ptr<\w+>>, tensor<\d+x\d+x(i\d+)>", ttir)
        bases = [(r, c, t) for r, c, t in row_steps if "1" in (r, c)]
        assert len(bases) >= 2, name
        assert all(t == "i64" for _, _, t in bases), (name, bases)
        assert re.search(r"arith\.extsi %stride_\w+ : i32 to i64", ttir), name


# ---------------------------------------------------------------------------------------------
# Autocast: fp32 activations meet 16-bit weights


def test_autocast_variant_is_gated_and_pruned_by_its_shared_memory():
    """The default gate compiles fwd, dx and dW with fp32 activations and bf16 / fp16 GEMMs on
    sm_80 and sm_90, in exactly the configs the autotuner's prune keeps for that operand mix: the
    dW pipeline then holds fp32 tiles of x and g, and 128x128x64 at 4 stages needs 200,704 B on
    sm_80 (limit 166,912), so the prune drops it; every other 16-bit config stays."""
    assert {"autocast-bf16", "autocast-fp16"} <= set(aot.DEFAULT_DTYPES)
    jobs = aot.gate_jobs(kinds=aot.KINDS, dtypes=("autocast-bf16", "autocast-fp16"))
    assert {(k, d, a) for k, _, d, a, *_ in jobs} == {(k, d, a) for k in aot.KINDS for a in aot.DEFAULT_ARCHS
                                                      for d in ("autocast-bf16", "autocast-fp16")}
    big = "128x128x64 w8 s4"
    for dtype in ("autocast-bf16", "autocast-fp16"):
        args, _ = aot.example_launch("dx", dtype)
        named = dict(zip(aot.TUNED["dx"].arg_names, args))
        assert named["x_ptr"].dtype == named["g_ptr"].dtype == named["dx_ptr"].dtype == torch.float32
        assert named["w_ptr"].dtype == aot.DTYPES[dtype][0]
        dw = [aot.config_name("dw", c) for c in aot.gate_configs("dw", dtype)]    # the autotuner's own prune
        assert big not in dw and len(dw) == len(configs.shipped_configs("dw", 2)) - 1
        for kind in ("fwd", "dx"):
            assert len(aot.gate_configs(kind, dtype)) == len(configs.shipped_configs(kind, 2))
    assert big in [aot.config_name("dw", c) for c in aot.gate_configs("dw", "bf16")]
    # the stack's fwd and bwd are gated under autocast too (fp32 activations, 16-bit weights); its
    # reduce, which sees no activation, only in the plain dtypes
    stack = {(k, d) for k, _, d, *_ in aot.gate_jobs(kinds=aot.STACK_KINDS)}
    plain = {"fp16", "bf16", "fp32", "tf32"}
    assert {d for k, d in stack if k == "stack_reduce"} == plain
    assert {d for k, d in stack if k != "stack_reduce"} == plain | {"autocast-bf16", "autocast-fp16"}
    args, _ = aot.stack_example_launch("stack_bwd", "autocast-bf16", 64, "deterministic")
    named = dict(zip(inspect.signature(aot._STACK_KERNELS["stack_bwd"].fn).parameters, args))
    assert named["x_ptr"].dtype == torch.float32 and named["w_ptr"].dtype == torch.bfloat16


_AUTOCAST = textwrap.dedent('''
    import json, sys
    from fusedres import aot
    out = {}
    for name, (kind, config, dtype, arch) in {
        "dropped": ("dw", "128x128x64 w8 s4", "autocast-bf16", "sm_80"),     # what the prune drops
        "dw80": ("dw", "128x128x64 w8 s3", "autocast-bf16", "sm_80"),        # the largest it keeps
        "dw90": ("dw", "64x128x64 w4 s4", "autocast-fp16", "sm_90"),
        "fwd90": ("fwd", "128x128x64 w8 s4", "autocast-bf16", "sm_90"),
        "dx80": ("dx", "128x64x64 w4 s4", "autocast-fp16", "sm_80"),         # the most registers
    }.items():
        r = aot.compile_config(kind, aot.config_from_name(kind, config), dtype, arch, keep_ir=True)
        r["x_fp32"] = "%x_ptr: !tt.ptr<f32>" in r.pop("ttir")
        r.pop("ptx")
        out[name] = r
    json.dump(out, sys.stdout)
''')


def test_autocast_variant_compiles():
    """A sample of the autocast variant compiled for real targets (the default gate compiles all
    of it): the kept configs pass with tensor cores and fp32 x in the signature, and the config
    the prune drops really overflows sm_80's shared memory."""
    proc = _run(["-c", _AUTOCAST], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    dropped = out.pop("dropped")
    assert dropped["error"] is None and dropped["shared_bytes"] > dropped["shared_limit"] == 166912
    assert any(f.startswith("shared memory") for f in dropped["failures"])
    for name, r in out.items():
        assert r["ok"] and r["activations"] == "fp32" and r["x_fp32"], (name, r["failures"])
        assert r["tensor_core_instr"] == {"sm_80": "mma.sync", "sm_90": "wgmma.mma_async"}[r["arch"]], name
        kind, config = r["kernel"], aot.config_from_name(r["kernel"], r["config_name"])
        elem, ops = _operand_sizes(kind, r["variant"])
        # the prune's model is within a tile of what the compiler allocates
        assert abs(configs.pipeline_smem_bytes(kind, config, elem, ops) - r["shared_bytes"]) <= 32 * 1024, name


# ---------------------------------------------------------------------------------------------
# Split-M dW: the split variant of the dW kernel and its reduce


def test_split_variants_are_gated():
    """dW's split variants compile in every shipped dW config, plus the reduce (one config) once
    per dtype, variant and arch; fwd and dx skip them; the CLI's default features include them."""
    from fusedres.kernels import plan
    jobs = aot.gate_jobs(kinds=aot.KINDS, dtypes=("bf16",), features=aot.SPLIT_FEATURES)
    assert {k for k, *_ in jobs} == {"dw", aot.REDUCE_KIND}
    for feats in aot.SPLIT_FEATURES:
        dw = [j for j in jobs if j[0] == "dw" and j[5] == feats]
        assert len(dw) == sum(len(aot.gate_configs("dw", "bf16", features=feats, arch=a)) for a in aot.DEFAULT_ARCHS)
        red = [j for j in jobs if j[0] == aot.REDUCE_KIND and j[5] == feats]
        assert sorted((aot.config_name(aot.REDUCE_KIND, j[1]), j[3]) for j in red) == sorted(
            (aot.config_name(aot.REDUCE_KIND, c), a) for a in aot.DEFAULT_ARCHS
            for c in plan.reduce_configs(2, aot.arch_limits(a)))
    args, consts = aot.example_launch("dw", "bf16", features="split+alpha+proj")
    named = dict(zip(kernels.residual_dw_kernel.arg_names, args))
    assert named["part_ptr"] is not None and named["dp_ptr"] is not None and named["dalpha_ptr"] is None
    assert {"split", "proj"} <= set(consts["RECIPE"].split("|"))
    assert aot.gate_jobs(kinds=aot.KINDS, dtypes=("bf16",)) == aot.gate_jobs(kinds=aot.KINDS, dtypes=("bf16",),
                                                                             features=aot.FEATURES)


_SPLIT = textwrap.dedent('''
    import json, sys
    from fusedres import aot
    from fusedres.kernels import configs, plan
    out = []
    for feats in aot.SPLIT_FEATURES:
        for arch in ("sm_80", "sm_90"):
            cfg = aot.gate_configs("dw", "bf16", features=feats)[0]
            for kind, c in (("dw", cfg), *((aot.REDUCE_KIND, rc) for rc in plan.REDUCE_CONFIGS)):
                r = aot.compile_config(kind, c, "bf16", arch, features=feats)
                out.append({k: r[k] for k in ("kernel", "arch", "features", "ok", "failures", "spill_bytes",
                                              "advisories", "tensor_core_instr")})
    json.dump(out, sys.stdout)
''')


def plan_configs():
    from fusedres.kernels import plan
    return plan.REDUCE_CONFIGS


def test_split_variant_and_reduce_compile():
    """A sample (the largest bf16 tile, every split variant, both archs) of what the gate compiles:
    no spills, no C75xx advisory, the split dW still on tensor cores."""
    proc = _run(["-c", _SPLIT], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = json.loads(proc.stdout)
    assert len(records) == len(aot.SPLIT_FEATURES) * 2 * (1 + len(plan_configs()))
    for r in records:
        assert r["ok"] and r["spill_bytes"] == 0, r
        assert not any("C75" in a for a in r["advisories"]), r
        if r["kernel"] == "dw":
            assert r["tensor_core_instr"] == {"sm_80": "mma.sync", "sm_90": "wgmma.mma_async"}[r["arch"]], r


# ---------------------------------------------------------------------------------------------
# Every arch: each compiles its own list, and the covering set


def test_each_arch_compiles_the_list_its_prune_keeps():
    """The prune runs as on a device of the arch (its shared memory, its own drops): the 99 KB
    archs' lists are the sm_80 lists less what needs more than 96 KB of pipeline or spills there."""
    for kind in aot.KINDS:
        for dtype in ("bf16", "fp32", "autocast-bf16"):
            elem, ops = _operand_sizes(kind, dtype)
            # without a device: the 160 KB lists, no arch's own drops
            full = {aot.config_name(kind, c) for c in configs.shipped_configs(kind, elem, False, ops)}
            for arch in COVER_ARCHS:
                got = [aot.config_name(kind, c) for c in aot.gate_configs(kind, dtype, arch=arch)]
                assert got and set(got) <= full, (kind, dtype, arch)
                assert all(configs.pipeline_smem_bytes(kind, aot.config_from_name(kind, n), elem, ops) <= 96 * 1024
                           for n in got), (kind, dtype, arch)
    assert aot.arch_limits("sm_120").shared_per_block == 101376 == aot.ARCHS["sm_89"].shared_limit


def test_the_covering_set_compiles_each_shipped_config_once_in_its_heaviest_variant():
    full = aot.gate_jobs(kinds=aot.KINDS, dtypes=("bf16", "fp32"), archs=("sm_90", "sm_120"),
                         features=aot.FEATURES + aot.SPLIT_FEATURES)
    cover = aot.gate_jobs(kinds=aot.KINDS, dtypes=("bf16", "fp32"), archs=("sm_90", "sm_120"),
                          features=aot.FEATURES + aot.SPLIT_FEATURES, cover=True)
    def configs_of(jobs):
        return {(k, aot.config_name(k, c), d, a) for k, c, d, a, *_ in jobs}
    assert configs_of(cover) == configs_of(full) and len(cover) == len(configs_of(cover)) < len(full)
    for kind, c, dtype, arch, _, feats, _ in cover:
        if kind == aot.REDUCE_KIND:
            assert feats == "split+alpha+proj"
            continue
        shipping = [f for k, c2, d, a, _, f, _ in full
                    if (k, aot.config_name(k, c2), d, a) == (kind, aot.config_name(kind, c), dtype, arch)]
        assert feats == min(shipping, key=aot.COVER_ORDER.index), (kind, aot.config_name(kind, c), dtype, arch)


# ---------------------------------------------------------------------------------------------
# The activation table's rows (issue 21): each row besides relu in every pass, on sm_80 and sm_90

#: Per row: every config shipped for it (configs.ACT_DROPPED applied) in each pass, once, in the
#: heaviest variant that ships it (a projection's second K loop with a tensor alpha first, then the
#: row scale), in bf16 (16-bit lists) and tf32 (fp32 lists, tensor cores). The full set, every
#: default dtype and variant, is ``python -m fusedres.aot --cover --acts gelu,...`` (docs/compile-gate.md).
ACT_GATE = (("bf16", "tf32"), ("alpha+proj", "split+alpha+proj", "drop-path"))


@pytest.fixture(scope="module")
def act_gate(tmp_path_factory):
    dtypes, features = ACT_GATE
    path = tmp_path_factory.mktemp("aot") / "acts.json"
    proc = _run(["-m", "fusedres.aot", "-q", "--cover", "-j", str(os.cpu_count() or 2), "--kernels", "fwd,dx,dw",
                 "--dtypes", ",".join(dtypes), "--features", ",".join(features), "--archs", ",".join(FULL_ARCHS),
                 "--acts", ",".join(aot.GATE_ACTS), "--json", str(path)])
    records = json.loads(path.read_text()) if path.exists() else None
    return proc, records


@pytest.mark.parametrize("name", aot.GATE_ACTS)
def test_every_activation_row_compiles_clean_on_sm80_and_sm90(act_gate, name):
    """No spills, no serialised wgmma (C751x), tensor cores, in fwd, dx and dW (split included) on
    both archs, at exactly the configs the prune ships for the row."""
    proc, records = act_gate
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    mine = [r for r in records if r["kernel"] in aot.KINDS and r["features"].endswith("@" + name)]
    assert {(r["kernel"], r["arch"]) for r in mine} == {(k, a) for k in aot.KINDS for a in FULL_ARCHS}
    for r in mine:
        _check_record(r)
    dtypes, features = ACT_GATE
    for kind in aot.KINDS:
        for dtype in dtypes:
            for arch in FULL_ARCHS:
                shipped = {aot.config_name(kind, c) for f in features if f not in aot.SPLIT_FEATURES or kind == "dw"
                           for c in aot.gate_configs(kind, dtype, features=f"{f}@{name}", arch=arch)}
                got = {r["config_name"] for r in mine if (r["kernel"], r["variant"], r["arch"]) == (kind, dtype, arch)}
                assert got == shipped, (name, kind, dtype, arch)


def test_act_drops_are_derived_from_gate_records():
    """derive_act_drops reads failing records of a row into the table's shape, under the variant's
    own projection flag; a launch with a projection drops the list without one too; relu's and
    passing records drop nothing."""
    def rec(kernel, features, config, ok, variant="bf16", arch="sm_80"):
        return {"kernel": kernel, "features": features, "config_name": config, "ok": ok, "variant": variant,
                "arch": arch}
    table = aot.derive_act_drops([
        rec("fwd", "base@gelu", "64x128x64 w4 s4", False),
        rec("dx", "alpha+proj@silu", "128x64x64 w4 s4", False, arch="sm_90"),
        rec("dx", "alpha+proj@silu", "64x64x32 w4 s5", True, arch="sm_90"),
        rec("dw", "base", "64x128x64 w4 s4", False),
    ])
    assert table == {"gelu": {"sm_80": {"fwd": {(2, False): [(64, 128, 64, 4, 4)]}}},
                     "silu": {"sm_90": {"dx": {(2, True): [(128, 64, 64, 4, 4)]}}}}
    assert (64, 128, 64, 4, 4) not in {configs._tile("fwd", c) for c in configs.shipped_configs(
        "fwd", 2, act="gelu", limits=aot.arch_limits("sm_80"))}
    assert (64, 128, 64, 4, 4) in {configs._tile("fwd", c) for c in configs.shipped_configs(
        "fwd", 2, act="relu", limits=aot.arch_limits("sm_80"))}
    assert configs.act_dropped("gelu", "fwd", 2, True, "sm_80") >= configs.act_dropped("gelu", "fwd", 2, False, "sm_80")


# ---------------------------------------------------------------------------------------------
# The normalizations (issue 22): every norm recipe's passes and the norm's own kernels, sm_80 and sm_90

#: fp16 (the 16-bit lists, mma/wgmma) and fp32 (IEEE on CUDA cores: the most registers, where the
#: norm prologue's statistics loads spill first); bf16 and tf32 compile as fp16 and fp32 do in the
#: full run (``python -m fusedres.aot --cover --features norm-batch,norm-layer,norm-rms``).
NORM_GATE_DTYPES = ("fp16", "fp32")
#: The hidden-norm variants' forward (its statistics sink) in CI: fp16 (the full run compiled every
#: dtype; the sink's code is the same for each, the drops of the fp32 lists come from the prologue).
NORM_HIDDEN_DTYPES = ("fp16",)


@pytest.fixture(scope="module")
def norm_gate(tmp_path_factory):
    """The single block's norm variants in every pass with the norm's own kernels; the MLP block's
    hidden-norm variants in the forward (fc1's statistics sink, the piece no other variant has:
    their dh and dW2 passes are made of the single block's norm pieces)."""
    records = []
    procs = []
    for name, kinds, features, dtypes in (("norms", aot.KINDS + aot.NORM_KINDS, NORM_SINGLE, NORM_GATE_DTYPES),
                                          ("hidden", ("fwd",), NORM_HIDDEN + CHAIN_CI, NORM_HIDDEN_DTYPES)):
        path = tmp_path_factory.mktemp("aot") / f"{name}.json"
        procs.append(_run(["-m", "fusedres.aot", "-q", "--cover", "-j", str(os.cpu_count() or 2),
                           "--kernels", ",".join(kinds), "--dtypes", ",".join(dtypes),
                           "--features", ",".join(features), "--archs", ",".join(FULL_ARCHS), "--json", str(path)]))
        records += json.loads(path.read_text()) if path.exists() else []
    return procs, records


NORM_SINGLE = tuple(f for f in aot.NORM_FEATURES if not f.startswith("norm-hidden-"))
NORM_HIDDEN = tuple(f for f in aot.NORM_FEATURES if f.startswith("norm-hidden-"))
#: A chain's forward (fusedres.chain: the residual add with the next norm's statistics sink) in CI,
#: at fp16 with the hidden-norm forwards: the row sink on the single block's heaviest forward
#: (LayerNorm, LayerScale, DropPath, dropout) and the column sink on the MLP block's fc2 (the hidden
#: BatchNorm, both dropouts). The full run (every chain variant, fp16, bf16, fp32, tf32 and
#: autocast-bf16 on sm_80 and sm_90, fp16 and fp32 on sm_86, sm_89, sm_120) derived CHAIN_DROPPED.
CHAIN_CI = ("chain-layer", "chain-mlp-batch")


def test_every_norm_recipe_compiles_clean_on_sm80_and_sm90(norm_gate):
    """Every pass of the norm recipes at exactly the configs the prune ships for a norm launch
    (configs.NORM_DROPPED applied), and the statistics and finishing kernels: no spills, no
    serialised wgmma, tensor cores in the GEMMs."""
    procs, records = norm_gate
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for r in records:
        if r["kernel"] in aot.NORM_KINDS:
            where = f"{r['kernel']} {r['arch']} {r['variant']} {r['features']}"
            assert r["ok"] and r["spill_bytes"] == 0 and r["local_bytes"] == 0, where
            assert not any("C75" in a for a in r["advisories"]) and r["tensor_core_expected"] is None, where
        else:
            _check_record(r)
    got = {(r["kernel"], r["features"], r["variant"], r["arch"], r["config_name"]) for r in records}
    want = {(k, f, d, a, aot.config_name(k, c)) for k, feats in ((k, NORM_SINGLE) for k in aot.KINDS)
            for f in feats for d in NORM_GATE_DTYPES for a in FULL_ARCHS
            for c in aot.gate_configs(k, d, features=f, arch=a)}
    want |= {("fwd", f, d, a, aot.config_name("fwd", c)) for f in NORM_HIDDEN + CHAIN_CI for d in NORM_HIDDEN_DTYPES
             for a in FULL_ARCHS for c in aot.gate_configs("fwd", d, features=f, arch=a)}
    want |= {(k, f, d, a, aot.config_name(k, kernels.norm.NORM_CONFIGS[k])) for k in aot.NORM_KINDS
             for f in aot._NORM_KIND_FEATURES[k] for d in NORM_GATE_DTYPES for a in FULL_ARCHS}
    assert got == want


def test_norm_drops_are_derived_from_the_gate_records():
    """configs.NORM_DROPPED is derive_norm_drops of the gate's failing records, saved from the
    full run that derived it (tests/data/norm_gate_failures.json: every norm variant, fp16, bf16,
    fp32, tf32 and autocast-bf16 on sm_80 and sm_90, fp16 and fp32 on sm_86, sm_89 and sm_120;
    triton 3.7.1; regenerate with ``python -m fusedres.aot --cover --features <the norm variants>
    --json ... --derive-norm-drops`` and a table emptied first). The tiles it drops are gone from
    a norm launch's list only; the rest of that list compiles clean in CI
    (test_every_norm_recipe_compiles_clean_on_sm80_and_sm90)."""
    import pathlib
    path = pathlib.Path(__file__).parent / "data" / "norm_gate_failures.json"
    records = json.loads(path.read_text())
    assert records and not any(r["ok"] for r in records)
    assert aot.derive_norm_drops(records) == configs.NORM_DROPPED
    for arch, by_kind in configs.NORM_DROPPED.items():
        for kind, by_key in by_kind.items():
            for (elem, mixed), tiles in by_key.items():
                ops = ((4, 4) if kind == "dw" else (4, 2)) if mixed else None     # autocast: fp32 activations
                with_norm = {configs._tile(kind, c) for c in configs.shipped_configs(
                    kind, elem, operand_sizes=ops, limits=aot.arch_limits(arch), norm=True)}
                without = {configs._tile(kind, c) for c in configs.shipped_configs(
                    kind, elem, operand_sizes=ops, limits=aot.arch_limits(arch))}
                # (a list left empty falls back to the smallest tile, which the norm gate compiles)
                assert with_norm and not with_norm & set(tiles) and with_norm != without, (arch, kind, elem, mixed)


def test_chain_drops_are_derived_from_the_gate_records():
    """configs.CHAIN_DROPPED is derive_chain_drops of the chain variants' records, saved from the
    full run (tests/data/chain_gate_records.json, triton 3.7.1: every chain variant, fp16, bf16,
    fp32, tf32 and autocast-bf16 on sm_80 and sm_90, fp16 and fp32 on sm_86, sm_89 and sm_120); an
    arch that compiled clean has an empty entry (it keeps every tile); the dropped tiles leave only
    a chain's forward (a residual with a statistics sink), not the hidden norm's fc1 (a sink
    without a residual, gated with the hidden-norm variants)."""
    import pathlib
    records = json.loads((pathlib.Path(__file__).parent / "data" / "chain_gate_records.json").read_text())
    assert any(r["ok"] for r in records) and any(not r["ok"] for r in records)
    assert {r["features"] for r in records} <= set(aot.CHAIN_FEATURES)
    assert aot.derive_chain_drops(records) == configs.CHAIN_DROPPED
    assert {a for a, t in configs.CHAIN_DROPPED.items() if not t} == {"sm_90", "sm_120"}
    args, _ = aot.example_launch("fwd", "fp16", features="norm-hidden-batch")
    named = dict(zip(aot.TUNED["fwd"].arg_names, args))
    assert named["col_stats_ptr"] is not None and configs.norm_sites(named) == 1
    args, _ = aot.example_launch("fwd", "fp16", features="chain-batch")
    assert configs.norm_sites(dict(zip(aot.TUNED["fwd"].arg_names, args))) == 2
    for arch, by_kind in configs.CHAIN_DROPPED.items():
        for (elem, mixed), tiles in by_kind.get("fwd", {}).items():
            ops = (4, 2) if mixed else None     # (autocast's single block: fp32 x, 16-bit weight)
            sink = {configs._tile("fwd", c) for c in configs.shipped_configs(
                "fwd", elem, operand_sizes=ops, limits=aot.arch_limits(arch), norm=2)}
            prologue = {configs._tile("fwd", c) for c in configs.shipped_configs(
                "fwd", elem, operand_sizes=ops, limits=aot.arch_limits(arch), norm=1)}
            assert sink and not sink & set(tiles) and set(tiles) & prologue, (arch, elem, mixed)


# ---------------------------------------------------------------------------------------------
# Dropout (issue 23): every dropout recipe's passes, sm_80 and sm_90


@pytest.fixture(scope="module")
def dropout_gate(tmp_path_factory):
    """The dropout variants' covering sets in fp16 (the 16-bit lists, where the masks spilled:
    the full run's fp32 and tf32 failures are few and in the same table), every pass."""
    path = tmp_path_factory.mktemp("aot") / "dropout.json"
    proc = _run(["-m", "fusedres.aot", "-q", "--cover", "-j", str(os.cpu_count() or 2), "--kernels", "fwd,dx,dw",
                 "--dtypes", "fp16", "--features", ",".join(aot.DROPOUT_FEATURES), "--archs", ",".join(FULL_ARCHS),
                 "--json", str(path)])
    return proc, json.loads(path.read_text()) if path.exists() else []


def test_every_dropout_recipe_compiles_clean_on_sm80_and_sm90(dropout_gate):
    """Every pass of the dropout recipes at exactly the configs the prune ships for a launch with
    one or two keep masks (configs.DROPOUT_DROPPED applied): no spills, no serialised wgmma (the
    mask on dW's B tile included), tensor cores."""
    proc, records = dropout_gate
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for r in records:
        _check_record(r)
    got = {(r["kernel"], r["features"], r["arch"], r["config_name"]) for r in records}
    want = {(k, f, a, aot.config_name(k, c)) for k in aot.KINDS for f in aot.DROPOUT_FEATURES for a in FULL_ARCHS
            for c in aot.gate_configs(k, "fp16", features=f, arch=a)}
    assert got == want and len(got) > 50


def test_dropout_drops_are_derived_from_the_gate_records():
    """configs.DROPOUT_DROPPED is derive_dropout_drops of the gate's failing records, saved from the
    run that derived it (tests/data/dropout_gate_failures.json: the three dropout variants, fp16,
    bf16, fp32, tf32 and autocast-bf16 on sm_80, sm_90 and sm_120; triton 3.7.1). A launch with one
    mask drops the one-mask list only; with both masks (the MLP block's fc2 passes) both lists."""
    import pathlib
    path = pathlib.Path(__file__).parent / "data" / "dropout_gate_failures.json"
    records = json.loads(path.read_text())
    assert records and not any(r["ok"] for r in records)
    assert aot.derive_dropout_drops(records) == configs.DROPOUT_DROPPED
    for arch, by_kind in configs.DROPOUT_DROPPED.items():
        for kind, by_key in by_kind.items():
            for (elem, mixed, both), tiles in by_key.items():
                ops = ((4, 4) if kind == "dw" else (4, 2)) if mixed else None
                kept = {configs._tile(kind, c) for c in configs.shipped_configs(
                    kind, elem, operand_sizes=ops, limits=aot.arch_limits(arch), dropout=2 if both else 1)}
                assert kept and not kept & set(tiles), (arch, kind, elem, mixed, both)
    one = {configs._tile("dx", c) for c in configs.shipped_configs("dx", 2, limits=aot.arch_limits("sm_80"), dropout=1)}
    two = {configs._tile("dx", c) for c in configs.shipped_configs("dx", 2, limits=aot.arch_limits("sm_80"), dropout=2)}
    assert two < one
    # the hidden mask alone (not a gated variant of its own) takes the two-mask list
    assert [configs.dropout_sites(a) for a in ({}, {"drop_seed_ptr": 1}, {"a_drop_seed_ptr": 1},
                                               {"drop_seed_ptr": 1, "a_drop_seed_ptr": 1})] == [0, 1, 2, 2]


# ---------------------------------------------------------------------------------------------
# Every public option lands on pieces the compile gate compiles

def _pieces(kind, consts):
    """A launch's pieces: its activation (``ACT``/``DACT``, a jit function: its name; ``ACT_PARAM``,
    leaky_relu's slope, is a constant of the same code) and the parts of its recipe string (the
    scale kind and every operand it was given: what changes its code beside tiles and numerics)."""
    out = {(kind, part) for part in consts["RECIPE"].split("|")[2:]}
    for name in ("ACT", "DACT"):
        if name in consts:
            out.add((kind, name, getattr(consts[name], "__name__", consts[name])))
    return out


def _compiled_pieces(*record_lists):
    """(kind, constexpr, value) of every launch the gate runs compiled: each record's variant,
    rebuilt by the example launch it was compiled from."""
    out = set()
    for kind, feats in {(r["kernel"], r["features"]) for records in record_lists for r in records
                        if r["kernel"] in aot.KINDS}:
        _, consts = aot.example_launch(kind, "bf16", M=64, D=32, features=feats)
        out |= _pieces(kind, consts)
    return out


def test_every_api_option_lands_on_pieces_the_gate_compiles(gate, cover_gate, act_gate, norm_gate, dropout_gate,
                                                            monkeypatch, device):
    """Enumerate the public options (activation, alpha kind, projection, stochastic depth, bias,
    the MLP block's pre_act) and spy on every launch's constexprs: each piece a user can reach is
    one this module's gate runs compiled (their records: what CI compiles). Each module's launches
    are exactly the passes of the recipe it names (fusedres.block_recipe)."""
    import importlib
    from fusedres.recipes import single_recipe
    seen, keys = set(), []
    for module in map(importlib.import_module, ("fusedres.kernels.residual_fwd", "fusedres.kernels.residual_bwd")):
        original = module.launch_and_prepare

        def spy(kernel, tuned, kind, grid, args, consts, *rest, _original=original, **kw):
            seen.update(_pieces(kind, consts))
            if kind in aot.KINDS:
                keys.append(consts["RECIPE"])
            return _original(kernel, tuned, kind, grid, args, consts, *rest, **kw)
        monkeypatch.setattr(module, "launch_and_prepare", spy)
    D = 16
    x = torch.randn(2, 4, D, device=device, requires_grad=True)

    def step(block):
        """A training step of ``block`` that needs every gradient: its launches are its recipe's passes."""
        keys.clear()
        block(x).sum().backward()
        assert keys == [p.key for p in fusedres.block_recipe(block).passes()], block

    for act in [*activations.ACTIVATIONS, nn.LeakyReLU(0.2)]:
        for alpha in (1.0, 0.5, "scalar", "channel"):
            for bias in (True, False):
                block = fusedres.FusedResidualBlock(D, bias=bias, act=act, alpha=0.5,
                                                    learnable_alpha=alpha == "scalar",
                                                    alpha_per_channel=alpha == "channel", device=device)
                if isinstance(alpha, float):    # a Python float: passed by value (1.0: no scale)
                    keys.clear()
                    fusedres.fused_residual(x, block.weight, block.bias, alpha=alpha, act=act).sum().backward()
                    named = single_recipe(activations.resolve(act, "test"), alpha, bias=bias)
                    assert keys == [p.key for p in named.passes()], (act, alpha, bias)
                else:
                    step(block)
    for drop_path in (0.0, 0.5):
        block = fusedres.FusedResidualBlock(D, 2 * D, drop_path=drop_path, learnable_alpha=True, device=device)
        step(block)
        for pre_act in ("relu", None):
            step(fusedres.FusedResidualMLPBlock(D, 2 * D, drop_path=drop_path, pre_act=pre_act, act="gelu",
                                                learnable_alpha=True, device=device))
    for norm in ("batch", "layer", "rms", nn.LayerNorm(D, elementwise_affine=False), nn.LayerNorm(D, bias=False),
                 nn.BatchNorm1d(D, affine=False)):
        for alpha in ("scalar", "channel"):
            block = fusedres.FusedResidualBlock(D, norm=norm, drop_path=0.5, learnable_alpha=alpha == "scalar",
                                                alpha_per_channel=alpha == "channel", alpha=0.5, device=device)
            step(block)
        block.eval()
        step(block)             # BatchNorm on running statistics: no batch correction
        mlp = fusedres.FusedResidualMLPBlock(D, 2 * D, norm=copy.deepcopy(norm) if isinstance(norm, nn.Module) else norm,
                                             pre_act=None, act="gelu", device=device)
        step(mlp)
    for hidden in ("batch", "layer", "rms"):
        mlp = fusedres.FusedResidualMLPBlock(D, 2 * D, hidden_norm=hidden, drop_path=0.5, learnable_alpha=True,
                                             device=device)
        step(mlp)
        mlp.eval()
        step(mlp)
    for drops in (dict(dropout=0.5), dict(hidden_dropout=0.5), dict(dropout=0.5, hidden_dropout=0.5)):
        step(fusedres.FusedResidualMLPBlock(D, 2 * D, hidden_norm="batch", norm="layer", drop_path=0.5,
                                            learnable_alpha=True, device=device, **drops))
    for norm in (None, "layer"):
        step(fusedres.FusedResidualBlock(D, norm=norm, dropout=0.5, drop_path=0.5, learnable_alpha=True,
                                         alpha_per_channel=True, device=device))
    missing = seen - _compiled_pieces(*(records for _, records, _ in gate), cover_gate[1], act_gate[1],
                                      norm_gate[1], dropout_gate[1])
    assert seen and not missing, sorted(missing, key=str)
