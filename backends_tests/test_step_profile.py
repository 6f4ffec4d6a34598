"""benchmarks/step_profile.py's reading of an HLO module and a trace, on a hand-made module and
trace whose answer is worked out by hand (no backend runs)."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).parent.parent / "benchmarks" / "step_profile.py"
_spec = importlib.util.spec_from_file_location("ibot_benchmark_step_profile", _PATH)
step_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_profile)

_HLO = """HloModule jit_train_step

%fused_computation.1 (param_0: f32[30,40], param_1: f32[40,50]) -> f32[30,50] {
  %param_0 = f32[30,40]{1,0} parameter(0)
  %param_1 = f32[40,50]{1,0} parameter(1)
  ROOT %dot.1 = f32[30,50]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[30,40], b: f32[40,50], c: f32[50,7]) -> f32[30,7] {
  %a = f32[30,40]{1,0} parameter(0)
  %b = f32[40,50]{1,0} parameter(1)
  %c = f32[50,7]{1,0} parameter(2)
  %ynn_fusion.3 = f32[30,50]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(train_step)/jvp(student_backbone)/blocks_0/mlp/fc1/dot_general"}
  %dot.2 = f32[30,7]{1,0} dot(%ynn_fusion.3, %c), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/transpose(jvp(teacher_backbone))/x/dot_general"}
  ROOT %add_fusion = f32[30,7]{1,0} fusion(%dot.2), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(train_step)/jvp(ibot_loss)/add"}
}
"""


def test_hlo_ops_give_each_op_its_metadata_shape_and_dot_gflop():
    ops = step_profile._hlo_ops(_HLO)
    assert ops["ynn_fusion.3"][0].endswith("blocks_0/mlp/fc1/dot_general")
    assert ops["ynn_fusion.3"][1].startswith("f32[30,50]")
    assert ops["ynn_fusion.3"][2] == pytest.approx(2 * 30 * 40 * 50 / 1e9)
    assert ops["dot.2"][2] == pytest.approx(2 * 30 * 50 * 7 / 1e9)


def test_attribute_shares_each_slot_among_the_ops_running_in_it():
    ops = {"ynn_fusion.3": ("jit(train_step)/jvp(student_backbone)/fc1", "f32[30,50]", 1.0),
           "dot.2": ("jit(train_step)/transpose(jvp(teacher_backbone))/x", "f32[30,7]", 1.0),
           "add_fusion": ("jit(train_step)/jvp(ibot_loss)/add", "f32[30,7]", 0.0)}
    meta = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": t, "args": {"name": n}}
            for t, n in ((1, "python"), (2, "XLAEigen/a"), (3, "XLAEigen/b"))]
    spans = [
        {"ph": "X", "name": "$trainer.py:1 train_on_batch", "pid": 1, "tid": 1, "ts": 0, "dur": 1000},
        # 0.0-0.4 ms: the fusion alone; 0.4-0.6 ms: fusion and dot; 0.6-0.8 ms: nothing; 0.8-1.0: add.
        {"ph": "X", "name": "ynn_fusion.3", "pid": 1, "tid": 2, "ts": 0, "dur": 600},
        {"ph": "X", "name": "dot.2", "pid": 1, "tid": 3, "ts": 400, "dur": 200},
        {"ph": "X", "name": "add_fusion", "pid": 1, "tid": 2, "ts": 800, "dur": 200},
    ]
    (step,) = step_profile.attribute(meta + spans, ops)
    assert step["wall_ms"] == pytest.approx(1.0)
    assert step["idle_ms"] == pytest.approx(0.2)
    assert step["busy_threads_ms"] == pytest.approx({1: 0.6, 2: 0.2})
    assert step["rows"][("student", "forward", "matmul")] == pytest.approx(0.4 + 0.1)
    assert step["rows"][("teacher", "backward", "matmul")] == pytest.approx(0.1)
    assert step["rows"][("loss", "forward", "elementwise")] == pytest.approx(0.2)
    assert sum(step["rows"].values()) + step["idle_ms"] == pytest.approx(step["wall_ms"])


_TORCH_PATH = pathlib.Path(__file__).parent.parent / "benchmarks" / "torch_step_profile.py"
_torch_spec = importlib.util.spec_from_file_location("ibot_benchmark_torch_step_profile", _TORCH_PATH)
torch_step_profile = importlib.util.module_from_spec(_torch_spec)
_torch_spec.loader.exec_module(torch_step_profile)


def test_torch_profile_groups_ops_and_counts_product_flops():
    rows = [  # (op, input shapes, calls over 2 steps, own time in us), rates worked out by hand
        ("aten::addmm", [[50], [30, 40], [40, 50], [], []], 4, 2000.0),  # 2 x 30*40*50*2 = 240 kFLOP per step
        ("aten::bmm", [[6, 30, 40], [6, 40, 50]], 2, 1000.0),  # 6 x 30*40*50*2 = 720 kFLOP per step
        ("aten::_scaled_dot_product_flash_attention_for_cpu", [[2, 3, 5, 4]] * 3, 2, 600.0),
        ("aten::copy_", [[30, 50], [30, 50], []], 4, 400.0),
        ("aten::mul", [[30, 50], [30, 50]], 2, 300.0),
    ]
    out = torch_step_profile.summarise(rows, steps=2)
    assert out["groups_ms"] == {"products": 1.5, "attention": 0.3, "copies": 0.2, "other": 0.15}
    assert torch_step_profile.product_gflop("aten::addmm", rows[0][1]) == pytest.approx(120e-6)
    assert torch_step_profile.product_gflop("aten::bmm", rows[1][1]) == pytest.approx(720e-6)
    assert torch_step_profile.product_gflop("aten::mul", rows[4][1]) == 0.0
    top = {r["op"]: r for r in out["top"]}
    assert top["aten::addmm"]["calls"] == 2 and top["aten::addmm"]["ms"] == 1.0
    assert top["aten::addmm"]["gflop_per_s"] == pytest.approx(240e-6 / 1e-3, rel=1e-3)
    assert top["aten::bmm"]["gflop_per_s"] == pytest.approx(720e-6 / 0.5e-3, rel=1e-3)
    assert top["aten::mul"]["gflop_per_s"] is None


_TF_PATH = pathlib.Path(__file__).parent.parent / "benchmarks" / "tf_step_profile.py"
_tf_spec = importlib.util.spec_from_file_location("ibot_benchmark_tf_step_profile", _TF_PATH)
tf_step_profile = importlib.util.module_from_spec(_tf_spec)
_tf_spec.loader.exec_module(tf_step_profile)


def test_tf_profile_reads_the_op_table_and_groups_op_types():
    import json

    cols = [{"id": "type"}, {"id": "operation"}, {"id": "total_self_time"}]
    cells = [("_MklMatMul", "dense/MatMul", 3000.0), ("_MklBatchMatMulV2", "attn/bmm", 1000.0),
             ("Mul", "a/mul", 600.0), ("Mul", "b/mul", 200.0), ("IDLE", "IDLE", 400.0)]
    table = [{"cols": cols, "rows": [{"c": [{"v": v} for v in row]} for row in cells]}]
    rows = tf_step_profile.op_table(json.dumps(table).encode())
    assert rows[2] == {"type": "Mul", "operation": "a/mul", "total_self_time": 600.0}
    out = tf_step_profile.summarise(rows, steps=2)
    assert out["groups_ms"] == {"products": 2.0, "other": 0.4, "idle": 0.2}
    assert list(out["top_types_ms"].items())[:2] == [("_MklMatMul", 1.5), ("_MklBatchMatMulV2", 0.5)]
    assert out["top_types_ms"]["Mul"] == 0.4


def test_jax_memory_names_the_largest_fused_computations():
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "jax_memory.py"
    spec = importlib.util.spec_from_file_location("ibot_benchmark_jax_memory", path)
    jax_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jax_memory)
    flag = '%fI = pred[] is-finite(%pI), metadata={op_name="jit(train_step)/is_finite"}\n'
    hlo = (
        "HloModule m\n\n%fused_computation.7 (p0: f32[]) -> pred[] {\n"
        + "".join("  " + flag.replace("I", str(i)) for i in range(3))
        + '  ROOT %a = pred[] and(%f0, %f1), metadata={op_name="jit(train_step)/reduce_and"}\n}\n\n'
        "%fused_computation.8 (p0: f32[2]) -> f32[2] {\n  ROOT %n = f32[2]{0} negate(%p0)\n}\n\n"
        "ENTRY %main.3 (x: f32[2]) -> f32[2] {\n  %x = f32[2]{0} parameter(0)\n"
        "  %y = f32[2]{0} fusion(%x), kind=kLoop, calls=%fused_computation.8\n"
        "  ROOT %z = f32[2]{0} fusion(%y), kind=kLoop, calls=%fused_computation.8\n}\n"
    )
    rows = jax_memory.largest_computations(hlo, top=5)
    assert rows == [
        ("%fused_computation.7", 4, [("jit(train_step)/is_finite", 3), ("jit(train_step)/reduce_and", 1)]),
        ("%fused_computation.8", 1, []),
    ]
