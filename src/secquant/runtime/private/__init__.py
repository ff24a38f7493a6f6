"""Private inference: a quantized classifier computed on secret shares in Z_p by 3 parties (MPyC).

The client's input and the model's weights are both secret-shared (Shamir, threshold 1, semi-honest,
honest majority); only the client learns the predicted label. The quantized model maps exactly onto
integer arithmetic (compile.py), the field is chosen from proved bounds (program.analyse), and MPyC
runs it (engine.py) in three local processes authenticated with TLS (launch.py, tls.py).
MPyC is imported only inside the party processes.
"""

from .backend import PrivateBackend, PrivateResult, private_evaluate
from .compile import DEFAULT_PRECISION_BITS, UnsupportedLayerError, compile_program, encode_inputs
from .program import Program, analyse, run_reference, worst_case_input

__all__ = ["PrivateBackend", "PrivateResult", "private_evaluate", "compile_program", "encode_inputs",
           "UnsupportedLayerError", "DEFAULT_PRECISION_BITS", "Program", "analyse", "run_reference",
           "worst_case_input"]
