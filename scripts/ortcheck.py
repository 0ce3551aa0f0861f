"""Helpers shared by the check and comparison scripts: ONNX checker, ORT sessions, op counts of ORT's
optimized graph, output comparison metrics, ORT's own quantize_static, top-1 agreement tables."""
import collections
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime import quantization as oq

ort.set_default_logger_severity(3)  # errors only: no warnings on every optimized-model save

# Float compute ops whose presence after ORT_ENABLE_ALL means a quantized region did not fuse.
# ORT's float-only fusions keep the base type in the report (FusedConv is still a float Conv).
FLOAT_OPS = {
    "Conv": "Conv", "FusedConv": "Conv", "ConvTranspose": "ConvTranspose",
    "Gemm": "Gemm", "FusedGemm": "Gemm", "MatMul": "MatMul", "FusedMatMul": "MatMul",
    "Add": "Add", "Mul": "Mul", "Concat": "Concat",
}
# Integer kernels ORT's QDQ fusions produce on the CPU EP.
INTEGER_OPS = {
    "QLinearConv", "QLinearConvTranspose", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat",
    "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul", "QLinearConcat",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearLeakyRelu", "QLinearSigmoid",
    "QLinearSoftmax", "QLinearWhere", "QLinearReduceMean",
}


def check_model(path):
    """Full ONNX checker on the path (so external data is found). Returns (ok, error message or None)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return True, None
    except Exception as e:  # checker raises several exception types
        return False, f"{type(e).__name__}: {e}".strip()


def session(path, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, optimized_path=None, threads=None):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = threads
    if optimized_path:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def optimized_nodes(path):
    """(name, op_type) of every node in ORT's ORT_ENABLE_ALL optimized graph of the model at path."""
    with tempfile.TemporaryDirectory() as tmp:
        opt_path = os.path.join(tmp, "optimized.onnx")
        session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, opt_path)
        graph = onnx.load(opt_path, load_external_data=False).graph
        return [(n.name, n.op_type) for n in graph.node]


def fusion_report(path):
    """Counts of fused integer ops and of remaining float compute ops in ORT's optimized graph,
    plus the names of the remaining float nodes."""
    nodes = optimized_nodes(path)
    integer = collections.Counter(op for _, op in nodes if op in INTEGER_OPS)
    float_left = collections.Counter(FLOAT_OPS[op] for _, op in nodes if op in FLOAT_OPS)
    float_nodes = [{"name": name, "op_type": FLOAT_OPS[op]} for name, op in nodes if op in FLOAT_OPS]
    return {"integer_ops": dict(sorted(integer.items())),
            "float_ops_left": dict(sorted(float_left.items())),
            "float_nodes_left": float_nodes,
            "all_ops": dict(sorted(collections.Counter(op for _, op in nodes).items()))}


def run_per_sample(path, data):
    """Run the model (unoptimized) on each sample data[name][i:i+1]; outputs concatenated on axis 0."""
    sess = session(path)
    input_names = [i.name for i in sess.get_inputs()]
    output_names = [o.name for o in sess.get_outputs()]
    count = len(data[input_names[0]])
    results = {name: [] for name in output_names}
    for i in range(count):
        outs = sess.run(output_names, {name: data[name][i:i + 1] for name in input_names})
        for name, value in zip(output_names, outs):
            results[name].append(value)
    return {name: np.concatenate(values, axis=0) for name, values in results.items()}


def top1_agreement(float_out, quant_out):
    """Fraction of rows whose argmax agrees, for outputs shaped [N, K] with K > 1; else None."""
    if float_out.ndim != 2 or float_out.shape[1] < 2:
        return None
    return float(np.mean(float_out.argmax(axis=1) == quant_out.argmax(axis=1)))


def output_metrics(float_out, quant_out):
    f = float_out.astype(np.float64)
    q = quant_out.astype(np.float64)
    rms_f = np.sqrt(np.mean(f * f))
    max_f = np.max(np.abs(f))
    return {
        "shape": list(f.shape),
        "rel_rms": float(np.sqrt(np.mean((q - f) ** 2)) / rms_f) if rms_f > 0 else float("inf"),
        "max_abs_rel": float(np.max(np.abs(q - f)) / max_f) if max_f > 0 else float("inf"),
        "top1_agreement": top1_agreement(f, q),
    }


def softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class NpzReader(oq.CalibrationDataReader):
    """Feeds an npz (arrays named after graph inputs, first axis = sample) one sample per batch."""

    def __init__(self, npz_path):
        data = np.load(npz_path)
        self.arrays = {name: data[name] for name in data.files}
        self.count = len(next(iter(self.arrays.values())))
        self.index = 0

    def get_next(self):
        if self.index >= self.count:
            return None
        i = self.index
        self.index += 1
        return {name: a[i:i + 1] for name, a in self.arrays.items()}


def ort_quantize(float_path, calib_npz, out_path, per_channel=True, method="minmax",
                 weight_type="int8", extra_options=None, activation_type="uint8"):
    """ONNX Runtime's own static quantization: QDQ, uint8 (or uint4) activations, int8 (or int4)
    weights, with its MinMax, Entropy or Percentile calibrator (extra_options as quantize_static
    takes them)."""
    methods = {
        "minmax": oq.CalibrationMethod.MinMax,
        "entropy": oq.CalibrationMethod.Entropy,
        "percentile": oq.CalibrationMethod.Percentile,
    }
    weights = {"int8": oq.QuantType.QInt8, "int4": oq.QuantType.QInt4}
    activations = {"uint8": oq.QuantType.QUInt8, "uint4": oq.QuantType.QUInt4}
    oq.quantize_static(
        str(float_path), str(out_path), NpzReader(calib_npz),
        quant_format=oq.QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=activations[activation_type],
        weight_type=weights[weight_type],
        calibrate_method=methods[method],
        extra_options=extra_options or {},
    )


CONFIDENT_PROB = 0.3


class Agreement:
    """Top-1 agreement with a float classifier on an evaluation npz, from ONNX Runtime's outputs, over
    all crops and over the crops the float model is confident about (p > CONFIDENT_PROB)."""

    def __init__(self, float_path, eval_npz):
        self.data = dict(np.load(eval_npz))
        logits = next(iter(run_per_sample(float_path, self.data).values()))
        self.top1 = logits.argmax(axis=1)
        self.confident = softmax(logits.astype(np.float64)).max(axis=1) > CONFIDENT_PROB

    def score(self, path):
        """(all, confident) agreement of the model at `path`, after onnx.checker's full check."""
        ok, error = check_model(path)
        if not ok:
            raise RuntimeError(f"checker FAILED: {error.splitlines()[0]}")
        logits = next(iter(run_per_sample(path, self.data).values()))
        agree = logits.argmax(axis=1) == self.top1
        return agree.mean(), agree[self.confident].mean()

    def describe(self, path):
        """One cell of a table: both agreements, with counts."""
        a, c = self.score(path)
        n, nc = len(self.top1), int(self.confident.sum())
        return f"{a:6.1%} ({round(a * n)}/{n})  {c:6.1%} ({round(c * nc)}/{nc})"


def print_rows(rows, header=True):
    """Rows of (configuration, method, result, seconds) as one aligned table."""
    if header:
        print(f"{'config':<22} {'method':<34} {'all crops':<17} {'confident crops':<17} {'seconds':>7}")
    for tag, label, result, seconds in rows:
        print(f"{tag:<22} {label:<34} {result}  {seconds:7.1f}")
    sys.stdout.flush()
