"""Private inference: a quantized classifier computed on secret shares in Z_p by 3 parties (MPyC).

The client's input and the model's weights are both secret-shared (Shamir, threshold 1, semi-honest,
honest majority); only the client learns the predicted label. The quantized model maps exactly onto
integer arithmetic (compile.py), the field is chosen from proved bounds (program.analyse), and MPyC
runs it (engine.py) in three local processes authenticated with TLS (launch.py, tls.py).
Exports are lazy, so a party process imports neither torch nor the compiler; MPyC is imported only there.
"""

from ..._lazy import lazy_exports

_EXPORTS = {"PrivateBackend": "backend", "PrivateResult": "backend", "private_evaluate": "backend",
            "compile_program": "compile", "encode_inputs": "compile", "UnsupportedLayerError": "compile",
            "DEFAULT_PRECISION_BITS": "compile", "Program": "program", "analyse": "program",
            "run_reference": "program", "worst_case_input": "program"}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__all__ = ["DEFAULT_PRECISION_BITS", "PrivateBackend", "PrivateResult", "Program", "UnsupportedLayerError", "analyse",
           "compile_program", "encode_inputs", "private_evaluate", "run_reference", "worst_case_input"]
