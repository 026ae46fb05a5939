"""Verification (SPEC section 4): the lowered model in ONNX Runtime against the QONNX reference.

The reference executor runs the original model; ONNX Runtime runs the lowered one at
``ORT_DISABLE_ALL`` and, unless told not to, at ``ORT_ENABLE_ALL``. When the lowered model
has a higher opset than the original, the reference runs the original upgraded to that
opset by the same version converter ``convert`` uses: ORT's float kernels for two opset
versions of one operator can differ in the last bit (AveragePool-11 and AveragePool-19
do), which is not something the lowering did. ``reference_opset`` pins the reference to
another opset (the fuzz tests use the original's to check the upgrade itself). Every graph
output is compared on every batch:

* ``qcdq`` at ``ORT_DISABLE_ALL``: bit-identical (max |diff| 0, NaN equal to NaN, same
  shape and dtype).
* ``qcdq`` at ``ORT_ENABLE_ALL`` and ``qop`` at both levels: the largest difference, in
  units of the output's quantization step (LSB), must not exceed ``tolerance_lsb``, from
  the output's unit-local reference: the reference run once more per batch with every
  internal tap replaced, once computed, by the lowered model's value (a near-tie one unit
  rounds the other way is not held against the units after it; see ``verifier``).
  Internal taps follow the same two rules; their end-to-end difference is reported only.

Results are compared per element in float64: NaN equals NaN, NaN against a number or
inf against a finite value is an infinite difference. A lowered model that ORT cannot
load or run is a failed verification carrying ORT's first message line.

The parts: ``inputs`` draws the feeds (or checks the user's), ``units`` finds what each
output is measured in (the LSB, the probe, float), ``compare`` tallies differences and
builds the report, ``runners`` wraps each runtime, ``sessions`` opens the lowered model in
each runner (as deployed, with its taps exposed, on the runner's own thread), ``verifier``
runs it all.
"""

from .compare import OutputRecord, VerificationReport
from .inputs import load_inputs_npz, make_inputs
from .runners import OPTIMIZED, RUNTIMES, UNOPTIMIZED, check_runtime
from .verifier import TARGETS, verify

__all__ = [
    "OPTIMIZED",
    "RUNTIMES",
    "TARGETS",
    "UNOPTIMIZED",
    "OutputRecord",
    "VerificationReport",
    "check_runtime",
    "load_inputs_npz",
    "make_inputs",
    "verify",
]
