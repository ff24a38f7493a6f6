"""Demo report sections: speed table and privacy ledger, masking summary, audit."""

from secquant.report import render_html
from secquant.report.sections import privacy_ledger_section, speed_section


def test_privacy_and_speed_sections_render_what_they_are_given():
    results = [
        {"model": "builtin:digits", "recipe": "w8a8", "calibration_data": "raw", "calibration_samples": 256,
         "privacy": []},
        {"model": "builtin:digits", "recipe": "w8a8 (DP eps=1)", "calibration_data": "private",
         "calibration_samples": 256, "privacy": [{"epsilon": 1.0, "delta": 1e-5, "mechanism": "Gaussian <OpenDP>"}]},
    ]
    masking = {"strings_scanned": 10, "strings_with_pii": 4, "total_found": 5, "detector": {"engine": "presidio"},
               "entities": {"EMAIL_ADDRESS": 3, "IBAN_CODE": 2}, "operators": {"EMAIL_ADDRESS": "tag",
                                                                               "IBAN_CODE": "fpe"}}
    sec = privacy_ledger_section(results, masking, "<p>audit</p>")
    assert sec["title"] == "Privacy"
    h = sec["html"]
    assert "private" in h and "1.0000" in h and "Gaussian &lt;OpenDP&gt;" in h  # escaped
    assert "<td>IBAN_CODE</td><td>2</td><td>fpe</td>" in h and "<p>audit</p>" in h
    speed = speed_section([{"model": "m", "recipe": "w8a8", "runtime": "onnxruntime", "value": 0.98,
                            "float_value": 0.99, "latency_ms": 2.0, "float_latency_ms": 4.0, "speedup": 2.0,
                            "onnx_size_bytes": 123}])
    page = render_html({"results": [{"model": "m", "recipe": "w8a8", "metric": "accuracy", "value": 0.98,
                                     "float_value": 0.99, "size_ratio": 0.3}], "sections": [speed, sec]})
    assert "<h2>Speed (ONNX Runtime)</h2>" in page and "<h2>Privacy</h2>" in page and "2.0000" in page
