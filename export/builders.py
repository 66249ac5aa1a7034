"""Lower one program (an nn.Module / converted PT2E graph + example inputs) to one artifact file:
the lowering the CPU backends (export.backends) and the scan-form study share. Each builder writes to
the path it is given (the caller passes an `atomic_path` temp file); the NPU backends' lowering is
in their own modules."""
from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("mcad.export")


@contextlib.contextmanager
def quiet():
    """Exporters print banners and progress to stdout; keep the CLI's output to our own lines."""
    if os.environ.get("MCAD_DEBUG"):
        yield
        return
    buf_out, buf_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        yield


# -- ExecuTorch ------------------------------------------------------------------------------------
def to_pte(edge, out_path: Path, alloc_inputs: bool) -> None:
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass

    cfg = ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(alloc_graph_input=alloc_inputs))
    prog = edge.to_executorch(cfg)
    with open(out_path, "wb") as f:
        prog.write_to_file(f)


def build_xnnpack(module, example, out_path: Path, dynamic_shapes=None, alloc_inputs: bool = True) -> None:
    """The second partitioner takes the float matmuls whose second operand is a runtime input (the
    search program's gallery scan), which XNNPACK's default partitioner leaves to ExecuTorch's portable
    `mm` (a plain loop, far slower). The first claims every static-weight op, so the
    encoder's linears keep their packed weights."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with quiet(), torch.no_grad():
        ep = torch.export.export(module, example, dynamic_shapes=dynamic_shapes)
        edge = to_edge_transform_and_lower(
            ep, partitioner=[XnnpackPartitioner(), XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)])
        to_pte(edge, out_path, alloc_inputs)


# -- ONNX ------------------------------------------------------------------------------------------
def build_onnx(module, example, out_path: Path, input_names, output_names, dynamic_shapes=None) -> None:
    with quiet(), torch.no_grad():
        torch.onnx.export(module, example, str(out_path), dynamo=True, opset_version=18, external_data=False,
                          input_names=list(input_names), output_names=list(output_names),
                          dynamic_shapes=dynamic_shapes, verbose=False)


# -- TFLite ----------------------------------------------------------------------------------------
def build_tflite(module, example, out_path: Path, input_names, dynamic_shapes=None, pt2e_quantizer=None,
                 x64: bool = True) -> None:
    """Inputs are passed by keyword so the TFLite signature names them (`ids`, `gallery`).
    x64: keep int64 token ids / top-k indices (the other runtimes' contract); False gives int32
    I/O, what NPU delegates (NNAPI, NeuroPilot) take."""
    import litert_torch

    kwargs = {}
    if pt2e_quantizer is not None:
        from litert_torch.quantize.quant_config import QuantConfig

        kwargs["quant_config"] = QuantConfig(pt2e_quantizer=pt2e_quantizer)
    with quiet(), torch.no_grad():
        edge = litert_torch.convert(module, sample_kwargs=dict(zip(input_names, example)),
                                    dynamic_shapes=dynamic_shapes, enable_x64=x64, **kwargs)
        edge.export(str(out_path))
