"""Compile-time GPU estimates: counting kernels, traffic and the roofline from optimised HLO
(jaxface.hlo_stats, runs everywhere), and compiling the real step for an H200 without one
(jaxface.gpu_target, only where the CUDA plugin is installed: pip install -e '.[gpu-compile]')."""

import json

import jax
import pytest

from jaxface import gpu_target, hlo_stats

# A small optimised GPU module written by hand: one of each kind of kernel, and a while loop
# that runs 3 times whose body launches a reduction fusion and a copy.
HLO = """HloModule jit_step, is_scheduled=true

%fused_add (p0: f32[1024], p1: f32[1024]) -> f32[1024] {
  %p0 = f32[1024]{0} parameter(0)
  %p1 = f32[1024]{0} parameter(1)
  ROOT %add.1 = f32[1024]{0} add(%p0, %p1)
}

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.2 = f32[] add(%a, %b)
}

%fused_reduce (p0.1: f32[1024]) -> f32[] {
  %p0.1 = f32[1024]{0} parameter(0)
  %c0 = f32[] constant(0)
  ROOT %reduce.1 = f32[] reduce(%p0.1, %c0), dimensions={0}, to_apply=%sum
}

%gemm_fusion_dot_computation (p0.2: bf16[64,256], p1.2: bf16[256,128]) -> f32[64,128] {
  %p0.2 = bf16[64,256]{1,0} parameter(0)
  %p1.2 = bf16[256,128]{1,0} parameter(1)
  ROOT %dot.1 = f32[64,128]{1,0} dot(%p0.2, %p1.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (param: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %param = (s32[], f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element(%param), index=0
  %v = f32[1024]{0} get-tuple-element(%param), index=1
  %r = f32[] fusion(%v), kind=kInput, calls=%fused_reduce
  %v2 = f32[1024]{0} copy(%v)
  ROOT %t = (s32[], f32[1024]{0}) tuple(%i, %v2)
}

%cond (param.1: (s32[], f32[1024])) -> pred[] {
  %param.1 = (s32[], f32[1024]{0}) parameter(0)
  ROOT %true = pred[] constant(true)
}

ENTRY %main (x: f32[1024], y: f32[1024], img: bf16[8,16,16,32], w: bf16[3,3,32,64], a: bf16[64,256], b: bf16[256,128]) -> f32[1024] {
  %x = f32[1024]{0} parameter(0)
  %y = f32[1024]{0} parameter(1)
  %img = bf16[8,16,16,32]{3,2,1,0} parameter(2)
  %w = bf16[3,3,32,64]{3,2,1,0} parameter(3)
  %a = bf16[64,256]{1,0} parameter(4)
  %b = bf16[256,128]{1,0} parameter(5)
  %loop = f32[1024]{0} fusion(%x, %y), kind=kLoop, calls=%fused_add
  %red = f32[] fusion(%loop), kind=kInput, calls=%fused_reduce
  %conv = (bf16[8,16,16,64]{3,2,1,0}, u8[0]{0}) custom-call(%img, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", backend_config={"cudnn_conv_backend_config":{}}
  %gemm = f32[64,128]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion_dot_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %tr = f32[128,64]{0,1} transpose(%gemm), dimensions={1,0}
  %cp = f32[1024]{0} copy(%loop)
  %ar = f32[1024]{0} all-reduce(%cp), replica_groups={}, to_apply=%sum
  %init = (s32[], f32[1024]{0}) tuple(%red, %ar)
  %wh = (s32[], f32[1024]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[1024]{0} get-tuple-element(%wh), index=1
}
"""

PEAKS = hlo_stats.Peaks(bandwidth=1e12, matrix_flops={"bf16": 1e15}, scalar_flops=1e13)


def test_kernels_by_kind_with_loop_trip_counts():
    stats = hlo_stats.analyse(HLO, PEAKS)
    assert stats.by_kind() == {
        "cudnn_conv": 1,
        "gemm": 1,
        "reduction_fusion": 1 + 3,  # the entry's and the loop body's, 3 times
        "loop_fusion": 1,
        "copy": 1 + 3,
        "transpose": 1,
        "collective": 1,
    }
    assert stats.count() == 13 and stats.unknown_trip_counts == 0


def test_traffic_is_operands_plus_result():
    stats = hlo_stats.analyse(HLO, PEAKS)
    by_name = {k.name: k for k in stats.kernels}
    assert by_name["loop"].bytes == 3 * 4096  # two f32[1024] in, one out
    assert by_name["red"].bytes == 4096 + 4
    conv_in = 8 * 16 * 16 * 32 * 2 + 3 * 3 * 32 * 64 * 2
    assert by_name["conv"].bytes == conv_in + 8 * 16 * 16 * 64 * 2  # workspace u8[0]
    assert by_name["v2"].times == 3 and by_name["v2"].bytes == 2 * 4096
    loop_body = 3 * ((4096 + 4) + 2 * 4096)
    assert stats.traffic() == pytest.approx(
        sum(k.bytes for k in stats.kernels if k.times == 1) + loop_body
    )


SPLIT_HLO = """HloModule jit_split, is_scheduled=true

%fused_split (p0: f32[1024], p1: f32[1024], p2: f32[]) -> (f32[256], f32[768]) {
  %p0 = f32[1024]{0} parameter(0)
  %p1 = f32[1024]{0} parameter(1)
  %p2 = f32[] parameter(2)
  %b = f32[1024]{0} broadcast(%p2), dimensions={}
  %m = f32[1024]{0} multiply(%p1, %b)
  %s = f32[1024]{0} add(%p0, %m)
  %s0 = f32[256]{0} slice(%s), slice={[0:256]}
  %s1 = f32[768]{0} slice(%s), slice={[256:1024]}
  ROOT %t = (f32[256]{0}, f32[768]{0}) tuple(%s0, %s1)
}

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.2 = f32[] add(%a, %b)
}

%fused_rows (p0.1: f32[1024]) -> f32[4] {
  %p0.1 = f32[1024]{0} parameter(0)
  %r = f32[4,256]{1,0} bitcast(%p0.1)
  %c0 = f32[] constant(0)
  ROOT %reduce.1 = f32[4]{0} reduce(%r, %c0), dimensions={1}, to_apply=%sum
}

ENTRY %main (x: f32[1024], y: f32[1024], lr: f32[]) -> f32[4] {
  %x = f32[1024]{0} parameter(0)
  %y = f32[1024]{0} parameter(1)
  %lr = f32[] parameter(2)
  %split = (f32[256]{0}, f32[768]{0}) fusion(%x, %y, %lr), kind=kLoop, calls=%fused_split
  ROOT %rows = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_rows
}
"""


def test_a_loop_fusion_reads_at_most_its_output_size_of_an_operand():
    """Splitting a flat vector reads each part once (the flat-view optimizer's update), but a
    loop fusion that reduces is charged its whole operand."""
    by_name = {k.name: k for k in hlo_stats.analyse(SPLIT_HLO, PEAKS).kernels}
    assert by_name["split"].bytes == 2 * 4096 + 4 + 4096  # x and y once, lr, two parts out
    assert by_name["rows"].bytes == 4096 + 16


def test_flops_and_roofline():
    stats = hlo_stats.analyse(HLO, PEAKS)
    by_name = {k.name: k for k in stats.kernels}
    assert by_name["conv"].flops == 2 * (8 * 16 * 16 * 64) * (3 * 3 * 32)
    assert by_name["gemm"].flops == 2 * 64 * 128 * 256
    assert by_name["gemm"].peak == 1e15  # bf16 operands: the matrix units
    expected = sum(
        k.times * max(k.flops / k.peak if k.flops else 0, k.bytes / 1e12) for k in stats.kernels
    )
    assert stats.roofline_s(PEAKS) == pytest.approx(expected)
    numbers = hlo_stats.summary(stats, PEAKS, global_batch=8, overhead_us=2.0)
    assert numbers["estimated_ms"] == pytest.approx(1e3 * expected + 13 * 2e-3)
    lines = hlo_stats.format_summary(numbers, goal_samples_per_s=8000)
    assert lines[0].startswith("kernels per step: 13 (cuDNN convolutions 1, GEMMs 1")
    assert "(goal 8,000)" in lines[-1]


def test_unknown_trip_count_is_counted_once_and_said():
    stats = hlo_stats.analyse(HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', ""))
    assert stats.unknown_trip_counts == 1 and stats.count() == 13 - 4


def test_not_hlo():
    with pytest.raises(hlo_stats.HloParseError, match="ENTRY"):
        hlo_stats.analyse("hello")


def test_spec_peaks_from_the_shipped_h200_spec():
    target = gpu_target.load_target("h200")
    assert target.spec.startswith("# From openxla/xla")  # source and licence kept
    peaks = target.peaks
    assert peaks.bandwidth == 4.8e12
    assert 980e12 < peaks.flops_for("bf16") < 1000e12  # the data sheet's dense 989
    assert 60e12 < peaks.scalar_flops < 70e12  # float32 on the CUDA cores, 67
    assert target.memory_bytes > 140 * 1024**3


def test_unknown_target_names_the_known_ones():
    with pytest.raises(gpu_target.TargetError, match="known targets are h200"):
        gpu_target.load_target("h300")


def test_profile_cli_input_errors(capsys, monkeypatch, repo):
    from compare import profile

    monkeypatch.chdir(repo)
    assert profile.main(["--config", "configs/demo.py", "--target", "h300"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "known targets are h200" in err[0]
    if not gpu_target.plugin_installed():
        assert profile.main(["--config", "configs/demo.py", "--target", "h200"]) == 2
        err = capsys.readouterr().err
        assert "pip install -e '.[gpu-compile]'" in err


needs_plugin = pytest.mark.skipif(
    not gpu_target.plugin_installed(),
    reason="the CUDA plugin is not installed (pip install -e '.[gpu-compile]')",
)


@needs_plugin
def test_a_spec_the_jaxlib_rejects_names_the_field(tmp_path):
    spec = gpu_target.load_target("h200").spec.replace(
        "  core_count: 132\n", "  core_count: 132\n  no_such_field: 1\n"
    )
    path = tmp_path / "bad.txtpb"
    path.write_text(spec)
    with pytest.raises(gpu_target.TargetError, match='no field named "no_such_field"'):
        gpu_target.devices(gpu_target.load_target(str(path)))


@needs_plugin
@pytest.mark.slow
def test_profile_compiles_the_step_for_an_h200(repo, tmp_path, monkeypatch, capsys):
    from compare import profile

    monkeypatch.chdir(repo)
    args = ["--config", "configs/demo.py", "--target", "h200", "--batch", "4", "--devices", "2"]
    args += ["--out", str(tmp_path), "--config.num_classes=100"]
    assert profile.main(args) == 0
    out = capsys.readouterr().out
    assert "COMPILE-TIME ESTIMATE" in out and "samples/s (goal 16,000)" in out
    summary = json.loads((tmp_path / "profile.json").read_text())
    assert summary["kernels_by_kind"]["cudnn_conv"] > 0
    assert summary["kernels_by_kind"]["collective"] > 0  # two devices: the head's reductions
    assert summary["memory"]["peak"] > 0 and summary["roofline_ms"] > 0
    assert "__cudnn$conv" in (tmp_path / "step.hlo.txt").read_text()


def test_plan_without_the_plugin_falls_back_to_the_cpu_and_says_so(repo, capsys, monkeypatch):
    from jaxface import plan

    monkeypatch.chdir(repo)
    monkeypatch.setattr(gpu_target, "plugin_installed", lambda: False)
    args = ["--config", "configs/demo.py", "--devices", "2", "--target", "h200"]
    args += ["--memory-gb", "0.05", "--config.batch_size=2", "--config.num_classes=2000"]
    assert plan.main(args) == 0
    captured = capsys.readouterr()
    assert "CPU stand-in" in captured.err and "pip install -e '.[gpu-compile]'" in captured.err
    assert "2 devices: per device" in captured.out
    assert "largest class count within 0.05 GB per device" in captured.out


def test_plan_unknown_target(repo, capsys, monkeypatch):
    from jaxface import plan

    monkeypatch.chdir(repo)
    assert plan.main(["--config", "configs/demo.py", "--devices", "1", "--target", "x1"]) == 2
    assert "known targets are h200" in capsys.readouterr().err


@needs_plugin
@pytest.mark.slow
def test_plan_uses_the_gpu_buffer_assignment(repo):
    from jaxface.config import load_config
    from jaxface.plan import step_memory

    cfg = load_config(repo / "configs/demo.py", {"batch_size": "2", "num_classes": "1000"})
    mem = step_memory(cfg, 2, gpu_target.load_target("h200"))
    assert mem["temporaries"] > 0 and mem["peak"] >= mem["arguments"] > 0


# A Partial FC head's step in miniature: gather 100 of 10,000 rows, then scatter-add 100
# rows back into the block in place.
GATHER_SCATTER = """HloModule jit_head, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_gather_reduce (param_0: f32[10000,64], param_1: s32[100,1]) -> f32[100] {
  %param_0 = f32[10000,64]{1,0} parameter(0)
  %param_1 = s32[100,1]{1,0} parameter(1)
  %g = f32[100,64]{1,0} gather(%param_0, %param_1), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,64}
  %z = f32[] constant(0)
  ROOT %r = f32[100]{0} reduce(%g, %z), dimensions={1}, to_apply=%add
}

%fused_scatter (param_0.1: f32[10000,64], param_1.1: s32[100,1], param_2.1: f32[100,64]) -> f32[10000,64] {
  %param_0.1 = f32[10000,64]{1,0} parameter(0)
  %param_1.1 = s32[100,1]{1,0} parameter(1)
  %param_2.1 = f32[100,64]{1,0} parameter(2)
  ROOT %sc = f32[10000,64]{1,0} scatter(%param_0.1, %param_1.1, %param_2.1), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%add
}

ENTRY %main (w: f32[10000,64], i: s32[100,1], u: f32[100,64]) -> f32[10000,64] {
  %w = f32[10000,64]{1,0} parameter(0)
  %i = s32[100,1]{1,0} parameter(1)
  %u = f32[100,64]{1,0} parameter(2)
  %red = f32[100]{0} fusion(%w, %i), kind=kInput, calls=%fused_gather_reduce
  ROOT %upd = f32[10000,64]{1,0} fusion(%w, %i, %u), kind=kInput, calls=%fused_scatter
}
"""


def test_gathers_and_scatters_are_charged_the_rows_they_touch():
    stats = hlo_stats.analyse(GATHER_SCATTER, PEAKS)
    by_name = {k.name: k for k in stats.kernels}
    rows, indices = 100 * 64 * 4, 100 * 4
    # The gather reads 100 rows of the 2.56 MB block, not the block.
    assert by_name["red"].bytes == rows + indices + 100 * 4
    # The in-place scatter reads the indices and updates and writes 100 rows: the rest of
    # the block is neither read nor written.
    assert by_name["upd"].written == rows
    assert by_name["upd"].bytes == rows + indices + rows + rows


@needs_plugin
@pytest.mark.slow
def test_eight_h200s_step_is_as_lean_as_one_and_sums_in_float32(repo):
    """The multi-device step's structure, compiled for H200s (docs/multi-gpu.md has r50's
    numbers): per-device gradients summed in a few float32 buckets (bf16 on request) and
    BatchNorm statistics kept per device leave the 8-device program within a handful of
    kernels of the 1-device one (the step of before had one slice kernel per gradient and
    one running-statistic update per BatchNorm leaf more)."""
    from jaxface import collectives
    from jaxface.config import load_config
    from jaxface.setup import build

    target = gpu_target.load_target("h200")
    base = {"batch_size": "8", "num_classes": "1000", "precision": "bf16"}
    kernels, reduced = {}, {}
    for devices, reduce in ((1, "fp32"), (8, "fp32"), (8, "bf16")):
        cfg = load_config(repo / "configs/demo.py", {**base, "grad_reduce": reduce})
        run = build(cfg, gpu_target.mesh(target, devices))
        hlo = run.lower().compile().as_text()
        stats = hlo_stats.analyse(hlo, target.peaks)
        kernels[devices, reduce] = stats.count()
        # Kernels held OHWI, as cuDNN reads them: no transposes (106 in r50's step when
        # they were held HWIO).
        assert stats.by_kind().get("transpose", 0) == 0
        found, _ = collectives.analyse(hlo, target.peaks, devices)
        # The gradient buckets: the all-reduces of more than the head's per-sample sums.
        reduced[devices, reduce] = {
            c.shape.split("[")[0] for c in found if c.kind == "all-reduce" and c.bytes > 1e5
        }
    leaves = len(jax.tree.leaves(run.init(0).params["backbone"]))
    assert kernels[8, "fp32"] - kernels[1, "fp32"] <= 30 < leaves
    assert reduced[8, "fp32"] == {"f32"} and reduced[8, "bf16"] == {"bf16"}


@needs_plugin
@pytest.mark.slow
def test_plan_for_several_hosts(repo, capsys, monkeypatch):
    from jaxface import plan

    monkeypatch.chdir(repo)
    args = ["--config", "configs/demo.py", "--devices", "4", "--target", "h200", "--hosts", "2"]
    assert plan.main(args + ["--config.batch_size=2"]) == 0
    assert "4 devices on 2 hosts (NVIDIA H200" in capsys.readouterr().out


@needs_plugin
@pytest.mark.slow
def test_the_dense_head_never_writes_its_gradient_on_an_h200(repo):
    """On a GPU the dense head's SGD step is the Pallas kernel (jaxface.heads.centre_update):
    no kernel writes a float32 [rows, E] matrix other than the kernel's own in-place W and
    m; with fused_head_update=false XLA writes the gradient (a GEMM of that shape)."""
    from jaxface.config import load_config
    from jaxface.setup import build

    target = gpu_target.load_target("h200")
    base = {"batch_size": "64", "num_classes": "1000", "precision": "bf16"}
    written = {}
    for fused in ("true", "false"):
        cfg = load_config(repo / "configs/demo.py", {**base, "fused_head_update": fused})
        run = build(cfg, gpu_target.mesh(target, 1))
        rows, dim = run.init(0).params["head"]["centres"].shape
        hlo = run.lower().compile().as_text()
        stats = hlo_stats.analyse(hlo, target.peaks)
        entry = next(c for c in hlo_stats.parse(hlo).values() if c.entry)
        written[fused] = [
            k.kind for k in stats.kernels if f"f32[{rows},{dim}]" in entry.by_name[k.name].shape
        ]
    assert written["true"] == ["pallas"]
    assert "gemm" in written["false"] and "pallas" not in written["false"]


@needs_plugin
def test_the_fused_update_writes_each_vector_once_on_an_h200():
    """FusedSGD concatenates the gradients smallest leaf first (jaxface.fused_sgd.
    concat_order: XLA:GPU nests a concatenation of more than 128 operands and writes the
    first 128 out once more, which in tree order were most of the bytes) and updates every
    leaf from its slice, in place. 100 big leaves alternating with small ones in tree order,
    40 more small ones after them: the kernels write the gradient vector, the parameters and
    the momentum once each and under 1 % more (+64 % in tree order; 5x the leaves' bytes
    when the parameters and momentum were concatenated too)."""
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxface.fused_sgd import FusedSGD

    sizes = [65536 if i % 2 and i < 200 else 64 for i in range(240)]
    params = {f"p{i:03d}": jax.ShapeDtypeStruct((n,), np.float32) for i, n in enumerate(sizes)}
    schedule = optax.constant_schedule(0.1)
    chain = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(schedule, momentum=0.9))
    tx = FusedSGD(chain, schedule, 0.9, 5e-4, large=1 << 26)
    state = jax.eval_shape(tx.init, params)
    mesh = gpu_target.mesh(gpu_target.load_target("h200"), 1)
    replicated = NamedSharding(mesh, P())
    hlo = (
        jax.jit(tx.apply, in_shardings=replicated, out_shardings=replicated, donate_argnums=(0, 2))
        .lower(params, params, state)
        .compile()
        .as_text()
    )
    stats = hlo_stats.analyse(hlo)
    concatenated = sum(k.written * k.times for k in stats.kernels if "concatenate" in k.name)
    written = sum(k.written * k.times for k in stats.kernels)
    leaf_bytes = 4 * sum(sizes)
    assert leaf_bytes <= concatenated < 1.01 * leaf_bytes
    assert 3 * leaf_bytes <= written < 3.03 * leaf_bytes
    assert stats.by_kind().get("copy", 0) == 0  # in place


@needs_plugin
@pytest.mark.slow
def test_gradient_buckets_are_not_combined_on_h200s(repo):
    """jaxface.setup.GPU_STEP_OPTIONS turns XLA's all-reduce combiner off: the buckets are
    already the units to sum (combined, r50's bf16 buckets waited for each other in pairs).
    The demo backbone's bf16 gradients in 1 KB buckets: one all-reduce per bucket, where the
    combiner leaves one in all."""
    import jax.numpy as jnp

    from jaxface import collectives
    from jaxface.config import load_config
    from jaxface.setup import build, step_compiler_options
    from jaxface.step import make_train_step

    target = gpu_target.load_target("h200")
    cfg = load_config(repo / "configs/demo.py", {"batch_size": "8", "num_classes": "1000"})
    run = build(cfg, gpu_target.mesh(target, 8))
    step = make_train_step(run.model, run.tx, run.schedule, run.margin, cfg.num_classes,
                           run.mesh, reduce_dtype=jnp.bfloat16, bucket_bytes=1 << 10)  # fmt: skip
    options = step_compiler_options(run.mesh)
    combined = {k: v for k, v in options.items() if "combine" not in k}
    counts = []
    for opts in (options, combined):
        jitted = jax.jit(step, donate_argnums=0, compiler_options=opts)
        hlo = jitted.lower(run.step_abstract_state, *run.abstract_batch()).compile().as_text()
        found, _ = collectives.analyse(hlo, target.peaks, 8)
        counts.append(sum(c.kind == "all-reduce" and c.shape.startswith("bf16") for c in found))
    assert counts[0] > 10 and counts[1] <= 2, counts  # 17 and 1 when written


@needs_plugin
@pytest.mark.slow
def test_r50_writes_at_most_11_gb_a_step_on_one_h200(repo):
    """The multi-GPU issue's one-device goal, counted as docs/gpu.md counts it: r50 bf16,
    128 per GPU, 617,970 classes, one H200: at most 11 GB written per step (10.96). Each of
    the changes that reached it moved with XLA's fusion choices while it was being written
    (the BatchNorm + PReLU recompute from -0.26 to +0.32 GB): this keeps them in place."""
    from jaxface.config import load_config
    from jaxface.setup import build

    target = gpu_target.load_target("h200")
    cfg = load_config(repo / "configs/r50.py", {"batch_size": "128", "precision": "bf16"})
    run = build(cfg, gpu_target.mesh(target, 1))
    stats = hlo_stats.analyse(run.lower().compile().as_text(), target.peaks)
    assert sum(k.written * k.times for k in stats.kernels) <= 11e9
    assert stats.by_kind().get("transpose", 0) == 0
