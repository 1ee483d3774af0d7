"""jaxface.collectives on optimised GPU HLO written by hand: bytes, ring wire bytes,
overlap with the kernels between start and done, exposure, and the share of all-reduce
bytes started before the last convolution. Runs everywhere (no CUDA plugin needed)."""

import pytest

from jaxface import collectives, hlo_stats

# Schedule: a convolution, an async all-reduce (4 MB) over a copy, a second convolution
# (the last), a synchronous all-reduce (1 MB bf16) and an async all-gather over 4 devices.
HLO = """HloModule jit_step, is_scheduled=true

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add = f32[] add(%a, %b)
}

ENTRY %main (img: bf16[8,16,16,32], w: bf16[3,3,32,64], g: f32[1048576], h: bf16[524288], e: f32[256,512]) -> f32[1048576] {
  %img = bf16[8,16,16,32]{3,2,1,0} parameter(0)
  %w = bf16[3,3,32,64]{3,2,1,0} parameter(1)
  %g = f32[1048576]{0} parameter(2)
  %h = bf16[524288]{0} parameter(3)
  %e = f32[256,512]{1,0} parameter(4)
  %conv.1 = (bf16[8,16,16,64]{3,2,1,0}, u8[0]{0}) custom-call(%img, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", backend_config={"cudnn_conv_backend_config":{}}
  %ar-start = f32[1048576]{0} all-reduce-start(%g), channel_id=1, replica_groups=[1,4]<=[4], use_global_device_ids=true, to_apply=%sum
  %cp = f32[1048576]{0} copy(%g)
  %ar-done = f32[1048576]{0} all-reduce-done(%ar-start)
  %conv.2 = (bf16[8,16,16,64]{3,2,1,0}, u8[0]{0}) custom-call(%img, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", backend_config={"cudnn_conv_backend_config":{}}
  %ar.sync = bf16[524288]{0} all-reduce(%h), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%sum
  %ag-start = (f32[256,512]{1,0}, f32[1024,512]{1,0}) all-gather-start(%e), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
  %ag-done = f32[1024,512]{1,0} all-gather-done(%ag-start)
  ROOT %out = f32[1048576]{0} copy(%ar-done)
}
"""

PEAKS = hlo_stats.Peaks(bandwidth=1e12, matrix_flops={"bf16": 1e15}, scalar_flops=1e13)


def test_collectives_bytes_wire_overlap_and_gradient_share():
    found, last_conv = collectives.analyse(HLO, PEAKS, num_devices=4)
    assert [(c.kind, c.asynchronous, c.group) for c in found] == [
        ("all-reduce", True, 4), ("all-reduce", False, 4), ("all-gather", True, 4),
    ]  # fmt: skip
    ar, sync, ag = found
    assert ar.bytes == 4 * 2**20 and ar.wire_bytes() == pytest.approx(2 * 3 / 4 * 4 * 2**20)
    assert sync.shape == "bf16[524288]" and sync.bytes == 2**20
    assert ag.bytes == 2 * 2**20 and ag.wire_bytes() == pytest.approx(3 / 4 * 2 * 2**20)
    # The all-reduce overlaps the copy between its start and done: 8 MB at 1 TB/s.
    assert ar.overlap_kernels == 1 and ar.overlap_s == pytest.approx(8 * 2**20 / 1e12)
    assert ag.overlap_kernels == 0
    # Kernel positions: conv.1 0, ar-start 1, cp 2, conv.2 3, ar.sync 4, ag-start 5, out 6.
    assert last_conv == 3 and ar.position == 1 and sync.position == 4

    s = collectives.summary(found, last_conv, bandwidth=1e9)
    # 4 of the 5 MB of all-reduce start before the last convolution.
    assert s["gradient_overlap"] == pytest.approx(4 / 5)
    t_ar = ar.wire_bytes() / 1e9
    expected = (t_ar - ar.overlap_s) + sync.wire_bytes() / 1e9 + ag.wire_bytes() / 1e9
    assert s["exposed_ms"] == pytest.approx(1e3 * expected)
    assert s["comm_ms"] == pytest.approx(1e3 * sum(c.wire_bytes() for c in found) / 1e9)
    table = "\n".join(collectives.format_table(s))
    assert "| 1 | all-reduce | f32[1048576] | 4.19 |" in table and "80 %" in table


def test_link_bandwidth_nvlink_on_one_host_network_across_hosts():
    assert collectives.link_bytes_per_s("h200", 1, 400) == 450e9
    assert collectives.link_bytes_per_s("h200", 2, 400) == 50e9  # 400 Gb/s


def test_the_step_gets_the_collective_overlap_option_on_several_gpus_only():
    from types import SimpleNamespace

    import numpy as np

    from jaxface.setup import GPU_STEP_OPTIONS, step_compiler_options

    def mesh(platform, n):
        devices = np.array([SimpleNamespace(platform=platform)] * n)
        return SimpleNamespace(devices=devices, size=n)

    assert step_compiler_options(mesh("cuda", 8)) == GPU_STEP_OPTIONS
    assert step_compiler_options(mesh("gpu", 2)) == GPU_STEP_OPTIONS
    assert step_compiler_options(mesh("cuda", 1)) is None  # nothing to overlap
    assert step_compiler_options(mesh("cpu", 8)) is None  # CPU runs and tests untouched
