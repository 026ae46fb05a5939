"""Hostile inputs: every file in tests/hostile/ is refused cleanly, through the CLI and the API.

For each file (see ``tests/hostile/make_corpus.py`` for how each one is built):

* CLI ``python -m qlower convert FILE -o OUT``: exit code 2, exactly one stderr line
  ``qlower: error [<ExactClass>]: ...`` naming the node when a node is to blame, no
  traceback, no output file and no temporary file left behind;
* API ``qlower.convert(FILE)``: raises exactly ``<ExactClass>`` (not a subclass or a
  sibling) with ``.node`` set to the expected node.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import qlower
from qlower.errors import InvalidModelError, InvalidQuantizerError, ModelLoadError, QlowerError, UnsupportedError

HOSTILE = Path(__file__).resolve().parent / "hostile"
sys.path.insert(0, str(HOSTILE))
import make_corpus  # noqa: E402  (the corpus generator lives next to the files)

# file -> (exact error class, node the message must name, or None when no node is to blame)
EXPECTED: dict[str, tuple[type[QlowerError], str | None]] = {
    # not an ONNX model at all
    "empty.onnx": (ModelLoadError, None),
    "truncated.onnx": (ModelLoadError, None),
    "random_bytes.onnx": (ModelLoadError, None),
    "tensor_proto.onnx": (ModelLoadError, None),
    "graph_proto.onnx": (ModelLoadError, None),
    "no_nodes.onnx": (ModelLoadError, None),
    # structurally broken
    "cyclic.onnx": (InvalidModelError, "cycle_add"),
    "dangling_input.onnx": (InvalidModelError, "dangling_add"),
    "duplicate_tensor_names.onnx": (InvalidModelError, "second_writer"),
    "duplicate_initializer_output.onnx": (InvalidModelError, "shadowing_quant"),
    "duplicate_quantizer_names.onnx": (InvalidModelError, "twin_quant"),
    "output_from_nothing.onnx": (InvalidModelError, None),
    "inconsistent_tensor_data.onnx": (InvalidModelError, None),
    # quantizer parameters outside the contract
    "quant_nan_scale.onnx": (InvalidQuantizerError, "act_quant"),
    "quant_inf_scale.onnx": (InvalidQuantizerError, "act_quant"),
    "quant_zero_scale.onnx": (InvalidQuantizerError, "act_quant"),
    "quant_negative_scale.onnx": (InvalidQuantizerError, "act_quant"),
    "quant_empty_scale.onnx": (InvalidQuantizerError, "act_quant"),
    "quant_bitwidth_0.onnx": (InvalidQuantizerError, "act_quant"),
    "quant_bitwidth_nan.onnx": (InvalidQuantizerError, "act_quant"),
    "quant_bitwidth_vector.onnx": (InvalidQuantizerError, "act_quant"),
    "quant_zero_point_nan.onnx": (InvalidQuantizerError, "act_quant"),
    "quant_scale_wrong_rank.onnx": (InvalidQuantizerError, "act_quant"),
    "quant_scale_wrong_channels.onnx": (InvalidQuantizerError, "act_quant"),
    "quant_unknown_rounding_mode.onnx": (InvalidQuantizerError, "act_quant"),
    "quant_missing_inputs.onnx": (InvalidQuantizerError, "short_quant"),
    "bipolar_negative_scale.onnx": (InvalidQuantizerError, "bipolar"),
    "weight_quant_zero_scale.onnx": (InvalidQuantizerError, "weight_quant"),
    "float_quant_overflow_undefined.onnx": (InvalidQuantizerError, "float_quant"),
    "float_quant_mantissa_2_5.onnx": (InvalidQuantizerError, "float_quant"),
    "float_quant_max_val_0.onnx": (InvalidQuantizerError, "float_quant"),
    # Trunc versions: input count against the declared QONNX opset
    "trunc_v1_declared_v2.onnx": (InvalidModelError, "trunc_v1_node"),
    "trunc_v2_declared_v1.onnx": (InvalidModelError, "trunc_v2_node"),
    "trunc_four_inputs.onnx": (InvalidModelError, "trunc_short"),
    "trunc_v1_no_rounding_mode.onnx": (InvalidQuantizerError, "trunc_v1_no_mode"),
    "trunc_v2_no_rounding_mode.onnx": (InvalidQuantizerError, "trunc_no_mode"),
    # loading hazards
    "external_data_traversal.onnx": (ModelLoadError, None),
    "external_data_absolute.onnx": (ModelLoadError, None),
    "external_data_missing.onnx": (ModelLoadError, None),
    "opset_too_new.onnx": (UnsupportedError, None),
    "unknown_qonnx_op.onnx": (UnsupportedError, "thresholds"),
    "control_flow.onnx": (UnsupportedError, "branchy_if"),
}
# Words the one-line message must contain, where the node name alone does not say it.
FRAGMENTS: dict[str, tuple[str, ...]] = {
    "empty.onnx": ("empty",),
    "external_data_traversal.onnx": ("outside the model's folder",),
    "external_data_absolute.onnx": ("outside the model's folder",),
    "external_data_missing.onnx": ("missing",),
    "opset_too_new.onnx": ("opset 99",),
    "inconsistent_tensor_data.onnx": ("'s'",),
    "output_from_nothing.onnx": ("'ghost'",),
    "float_quant_overflow_undefined.onnx": ("has_inf or has_nan",),
    "float_quant_mantissa_2_5.onnx": ("2.5",),
    "trunc_v1_declared_v2.onnx": ("opset 2",),
    "trunc_v2_declared_v1.onnx": ("opset 1",),
}
FILES = sorted(EXPECTED)


def test_table_covers_the_corpus() -> None:
    """Every committed file has an expectation, and every expectation a file and a builder."""
    on_disk = sorted(p.name for p in HOSTILE.glob("*.onnx"))
    assert on_disk == FILES
    assert sorted(make_corpus.CORPUS) == FILES


def test_corpus_is_reproducible() -> None:
    """make_corpus.py regenerates the committed files byte for byte."""
    built = make_corpus.build()
    for name in FILES:
        assert (HOSTILE / name).read_bytes() == built[name], f"{name} differs from what make_corpus.py builds"


def _expected_prefix(name: str) -> str:
    error_class, node = EXPECTED[name]
    return f"qlower: error [{error_class.__name__}]: " + (f"{node}: " if node else "")


@pytest.mark.parametrize("name", FILES)
def test_cli_refuses(name: str, tmp_path: Path) -> None:
    error_class, node = EXPECTED[name]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "lowered.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "qlower", "convert", str(HOSTILE / name), "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(_expected_prefix(name)), lines[0]
    if node is None:
        # no node is to blame: the reason follows the class directly
        assert not lines[0].startswith(f"qlower: error [{error_class.__name__}]: None"), lines[0]
    for fragment in FRAGMENTS.get(name, ()):
        assert fragment in lines[0], lines[0]
    assert list(out_dir.iterdir()) == [], "an output (or temporary) file was left behind"


@pytest.mark.parametrize("name", FILES)
def test_api_raises_exact_class(name: str, tmp_path: Path) -> None:
    error_class, node = EXPECTED[name]
    out = tmp_path / "lowered.onnx"
    with pytest.raises(QlowerError) as info:
        qlower.convert(HOSTILE / name, output_path=out)
    assert type(info.value) is error_class, f"{type(info.value).__name__}: {info.value}"
    assert info.value.node == node, str(info.value)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["quant_zero_scale.onnx", "cyclic.onnx", "control_flow.onnx"])
def test_api_refuses_bytes_and_protos_the_same_way(name: str) -> None:
    """The same refusal whether the model arrives as a path, bytes or a ModelProto."""
    import onnx

    error_class, node = EXPECTED[name]
    data = (HOSTILE / name).read_bytes()
    for source in (data, onnx.load_from_string(data)):
        with pytest.raises(error_class) as info:
            qlower.convert(source)
        assert type(info.value) is error_class and info.value.node == node


@pytest.mark.parametrize("target", ["qcdq", "qop"])
@pytest.mark.parametrize("name", sorted(make_corpus.LOWERED))
def test_once_refused_valid_inputs_lower_exactly(name: str, target: str) -> None:
    """Valid QONNX the corpus used to hold (run-time Quant and Trunc scales, zero point outside the range,
    2.5 and 33 bits) converts and verifies bit-identical at ORT_DISABLE_ALL."""
    result = qlower.convert(make_corpus.LOWERED[name](), target)
    verification = result.report.verification
    assert verification is not None and verification.passed
    assert all(row.max_abs_diff == 0 for row in verification.outputs if row.level == "ORT_DISABLE_ALL")
