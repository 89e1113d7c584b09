"""TensorRT :class:`~slimsd.denoise.Runners` over the engines of ``slimsd export tensorrt``.

One ``IExecutionContext`` per engine (TensorRT 10 name-based API: ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``); device buffers are torch CUDA tensors, so no
pycuda / cuda-python dependency. Inputs are cast to the dtype each engine tensor has (fp16
engines take float32 arrays), outputs come back float32. Shapes must lie inside the engine's
optimisation profile: the batch range of ``export tensorrt --min/max-batch`` counts CFG rows
(2 per image), so keep ``--max-batch-size`` of the server at most half of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimsd.runners import ComponentRunners
from slimsd.specs import COMPONENTS


def _torch_dtype(trt, dt):
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32}
    if hasattr(trt.DataType, "INT64"):
        table[trt.DataType.INT64] = torch.int64
    if dt not in table:
        raise TypeError(f"unsupported TensorRT tensor dtype {dt}")
    return table[dt]


class _Engine:
    def __init__(self, trt, runtime, plan: Path):
        import torch

        self.trt = trt
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan}: TensorRT could not deserialize the engine (built by another TensorRT "
                               "version or for another GPU? rebuild with `slimsd export tensorrt`)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream()

    def __call__(self, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        # copies, execution and read-back all on one stream: no race with the default stream
        with torch.cuda.stream(self.stream):
            keep = []  # device tensors must outlive execute_async_v3
            for name in self.inputs:
                t = torch.from_numpy(np.ascontiguousarray(arrays[name])).to("cuda", self.dtypes[name]).contiguous()
                keep.append(t)
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            outs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"output {name}: shape {shape} unresolved (inputs outside the engine profile?)")
                outs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
                self.context.set_tensor_address(name, outs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            result = {n: t.float().cpu().numpy() for n, t in outs.items()}  # .cpu() waits for the stream
        return result


class TensorRTRunners(ComponentRunners):
    """``text_encoder.plan``, ``unet.plan``, ``vae_decoder.plan`` in ``engines_dir``."""

    def __init__(self, engines_dir: str | Path):
        from slimsd.export.tensorrt import check_environment

        trt = check_environment()  # a clear error without a GPU or the tensorrt package
        self.engines_dir = Path(engines_dir)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {}
        for name in COMPONENTS:
            plan = self.engines_dir / f"{name}.plan"
            if not plan.is_file():
                raise FileNotFoundError(f"{plan}: missing (build it with `slimsd export tensorrt`)")
            self.engines[name] = _Engine(trt, runtime, plan)

    def run(self, name: str, **inputs) -> dict[str, np.ndarray]:
        return self.engines[name](**inputs)
