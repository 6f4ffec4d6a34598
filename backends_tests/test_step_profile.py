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
